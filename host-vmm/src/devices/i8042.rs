//! The i8042 keyboard controller, reduced to what a `reboot=k` guest needs: a status register
//! that never reports a full buffer, and the 0xFE "pulse reset line" command on port 0x64,
//! which ends the VM cleanly.
//!
//! Registered at 0x60..=0x64; offset 0 is the data port, offset 4 status/command.

use super::bus::BusDevice;
use crate::exit::{ExitHandle, VmOutcome};

#[cfg(test)]
const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = 4;
/// Command: pulse the CPU reset line.
pub const CMD_RESET_CPU: u8 = 0xfe;

/// The controller.
pub struct I8042 {
    exit: ExitHandle,
}

impl I8042 {
    /// A controller that stops the VM through `exit` on reset.
    pub fn new(exit: ExitHandle) -> Self {
        Self { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output and input buffers empty (ready for a command). Data 0: nothing to
        // read. The other ports in the window read as 0 as well.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            log::debug!("i8042: guest requested a reset");
            self.exit
                .request(VmOutcome::GuestShutdown("i8042 reset".into()));
        } else {
            log::trace!("i8042: ignored write {data:02x?} at offset {offset}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_stops_the_vm_cleanly() {
        let exit = ExitHandle::new(1).unwrap();
        let mut dev = I8042::new(exit.clone());
        let mut status = [0xaa];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status[0] & 0x2, 0, "input buffer empty");
        dev.write(DATA_OFFSET, &[CMD_RESET_CPU]);
        dev.write(COMMAND_OFFSET, &[0x20]);
        dev.write(COMMAND_OFFSET, &[]);
        assert!(!exit.is_stopping());
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(exit.outcome().unwrap().exit_code(), 0);
    }
}
