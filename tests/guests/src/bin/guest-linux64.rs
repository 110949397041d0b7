//! Test guest without a PVH note: VMMs boot it through the Linux 64-bit boot protocol
//! (long mode, RSI = zero page, RIP = ELF entry `_start`).

#![no_std]
#![no_main]

use kiln_test_guests as _;
