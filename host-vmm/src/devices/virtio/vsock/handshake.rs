//! The hybrid-vsock handshake a host process speaks on the device's unix socket:
//! it writes `CONNECT <port>\n` and, once the guest accepted, reads `OK <host_port>\n`.
//!
//! Pure: bytes in, a port or an error out. Lines are bounded by [`MAX_LINE`]; the parser never
//! allocates more than that, so a client that never sends a newline costs 32 bytes.

/// Longest accepted handshake line, newline included.
pub const MAX_LINE: usize = 32;

/// Why a handshake was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// No newline within [`MAX_LINE`] bytes.
    #[error("handshake line longer than {MAX_LINE} bytes")]
    TooLong,
    /// The line is not `CONNECT <port>`.
    #[error("malformed handshake line {0:?}")]
    Malformed(String),
}

/// Accumulates the handshake line one read at a time.
#[derive(Debug, Default)]
pub struct HandshakeParser {
    line: Vec<u8>,
}

impl HandshakeParser {
    /// A parser that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one byte. Returns the requested port once the newline arrives.
    pub fn push(&mut self, byte: u8) -> Result<Option<u32>, HandshakeError> {
        if byte == b'\n' {
            return parse_connect(&self.line).map(Some);
        }
        if self.line.len() + 1 >= MAX_LINE {
            return Err(HandshakeError::TooLong);
        }
        self.line.push(byte);
        Ok(None)
    }
}

/// Parses `CONNECT <port>` (without the newline). The port is decimal, 1 to 10 digits, and
/// must fit in 32 bits.
pub fn parse_connect(line: &[u8]) -> Result<u32, HandshakeError> {
    let malformed = || HandshakeError::Malformed(String::from_utf8_lossy(line).into_owned());
    let digits = line.strip_prefix(b"CONNECT ").ok_or_else(malformed)?;
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(malformed());
    }
    // Only ASCII digits: the conversion cannot fail; the parse fails above u32::MAX.
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .ok_or_else(malformed)
}

/// The reply sent to the host process once the guest accepted the connection.
pub fn ok_line(host_port: u32) -> Vec<u8> {
    format!("OK {host_port}\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(input: &[u8]) -> Result<Option<u32>, HandshakeError> {
        let mut p = HandshakeParser::new();
        for &b in input {
            if let Some(port) = p.push(b)? {
                return Ok(Some(port));
            }
        }
        Ok(None)
    }

    #[test]
    fn valid_lines() {
        assert_eq!(feed(b"CONNECT 1024\n"), Ok(Some(1024)));
        assert_eq!(feed(b"CONNECT 0\n"), Ok(Some(0)));
        assert_eq!(feed(b"CONNECT 4294967295\n"), Ok(Some(u32::MAX)));
        assert_eq!(feed(b"CONNECT 12"), Ok(None), "incomplete");
        assert_eq!(ok_line(1_073_741_824), b"OK 1073741824\n");
    }

    #[test]
    fn malformed_lines() {
        for bad in [
            &b"CONNECT\n"[..],
            b"CONNECT \n",
            b"connect 5\n",
            b"CONNECT  5\n",
            b"CONNECT 5 \n",
            b"CONNECT -5\n",
            b"CONNECT +5\n",
            b"CONNECT 4294967296\n",
            b"CONNECT 99999999999\n",
            b"CONNECT 5\r\n",
            b"CONNECT 0x10\n",
            b"\n",
            b"CONNECT \xff\n",
        ] {
            assert!(
                matches!(feed(bad), Err(HandshakeError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn long_lines_are_cut_off() {
        let mut long = b"CONNECT ".to_vec();
        long.extend(std::iter::repeat_n(b'1', 100));
        assert_eq!(feed(&long), Err(HandshakeError::TooLong));
        assert_eq!(feed(&[b'x'; 10_000]), Err(HandshakeError::TooLong));
        // Exactly MAX_LINE bytes including the newline is fine length-wise.
        let mut edge = b"CONNECT ".to_vec();
        edge.extend(std::iter::repeat_n(b'0', MAX_LINE - 1 - edge.len()));
        edge.push(b'\n');
        assert_eq!(edge.len(), MAX_LINE);
        assert!(matches!(feed(&edge), Err(HandshakeError::Malformed(_))));
    }
}
