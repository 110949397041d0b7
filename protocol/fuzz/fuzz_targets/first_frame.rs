//! The agent's first-frame handling (`handshake::open_connection`) and the id/version peeks on
//! arbitrary bodies: never panic.
#![no_main]

use kiln_protocol::codec::{peek_request_id, peek_version};
use kiln_protocol::handshake::open_connection;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = open_connection(data);
    let _ = peek_request_id(data);
    let _ = peek_version(data);
});
