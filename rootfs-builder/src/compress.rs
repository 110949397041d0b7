//! Compression detection by magic bytes and streaming decoders (gzip, zstd, none).

use std::io::{self, BufRead, BufReader, Read};

/// Compression of a tar stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip (RFC 1952).
    Gzip,
    /// Zstandard.
    Zstd,
}

/// Identifies the compression from the first bytes of a stream. Formats we cannot read
/// (xz, bzip2) are reported as errors so the user sees a clear message.
pub fn detect(magic: &[u8]) -> Result<Compression, String> {
    if magic.starts_with(&[0x1f, 0x8b]) {
        Ok(Compression::Gzip)
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Compression::Zstd)
    } else if magic.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Err("xz compression is not supported (use gzip or zstd)".into())
    } else if magic.starts_with(b"BZh") {
        Err("bzip2 compression is not supported (use gzip or zstd)".into())
    } else {
        Ok(Compression::None)
    }
}

/// Wraps `reader` in a decoder chosen by sniffing its first bytes.
pub fn auto_decoder<'a, R: Read + 'a>(reader: R) -> io::Result<Box<dyn Read + 'a>> {
    let mut buf = BufReader::with_capacity(256 * 1024, reader);
    let kind =
        detect(buf.fill_buf()?).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(match kind {
        Compression::None => Box::new(buf),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buf)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(buf)?),
    })
}

/// Returns true when `block` (at least 512 bytes) looks like a tar header: a "ustar" magic or a
/// valid old-style header checksum.
pub fn looks_like_tar(block: &[u8]) -> bool {
    if block.len() < 512 {
        return false;
    }
    if &block[257..262] == b"ustar" {
        return true;
    }
    let field = &block[148..156];
    let text: String = field
        .iter()
        .take_while(|b| **b != 0 && **b != b' ')
        .map(|b| *b as char)
        .collect();
    let Ok(stored) = u32::from_str_radix(text.trim(), 8) else {
        return false;
    };
    let sum: u32 = block[..512]
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(*b)
            }
        })
        .sum();
    stored == sum && block[0] != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn detects_formats() {
        assert_eq!(detect(&[0x1f, 0x8b, 8]).unwrap(), Compression::Gzip);
        assert_eq!(
            detect(&[0x28, 0xb5, 0x2f, 0xfd]).unwrap(),
            Compression::Zstd
        );
        assert_eq!(detect(b"hello").unwrap(), Compression::None);
        assert!(detect(&[0xfd, b'7', b'z', b'X', b'Z', 0]).is_err());
    }

    #[test]
    fn corrupt_gzip_is_an_error() {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&[7u8; 10000]).unwrap();
        let mut data = enc.finish().unwrap();
        let mid = data.len() / 2;
        data[mid] ^= 0xff;
        data[mid + 1] ^= 0xff;
        let mut out = Vec::new();
        let res = auto_decoder(&data[..]).and_then(|mut r| r.read_to_end(&mut out));
        assert!(res.is_err());
    }
}
