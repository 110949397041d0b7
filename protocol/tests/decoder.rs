//! FrameDecoder and the blocking helpers: partial reads, several frames per read, oversize and
//! malformed frames, recovery, and a randomized no-panic test.

use std::io::Cursor;

use kiln_protocol::codec::read_frame_body;
use kiln_protocol::handshake::{open_connection, Opening};
use kiln_protocol::{
    encode_frame, read_frame, write_frame, AgentMessage, ErrorKind, FrameDecoder, FrameError,
    Hello, HostMessage, ProtocolVersion, Request, MAX_FRAME_LEN,
};

fn request(id: u64) -> HostMessage {
    HostMessage::Request {
        id,
        request: Request::WaitProcess {
            container_id: format!("container-{id}"),
            exec_id: "exec".into(),
        },
    }
}

#[test]
fn byte_by_byte_feed_yields_each_frame_once() {
    let mut stream = Vec::new();
    for id in 0..3 {
        stream.extend(encode_frame(&request(id)).unwrap());
    }
    let mut decoder = FrameDecoder::new();
    let mut got = Vec::new();
    for byte in &stream {
        decoder.feed(std::slice::from_ref(byte));
        while let Some(msg) = decoder.next_message::<HostMessage>().unwrap() {
            got.push(msg);
        }
    }
    assert_eq!(got, vec![request(0), request(1), request(2)]);
    assert!(!decoder.has_partial_frame());
}

#[test]
fn two_frames_in_one_read() {
    let mut stream = encode_frame(&request(1)).unwrap();
    stream.extend(encode_frame(&request(2)).unwrap());
    let half = encode_frame(&request(3)).unwrap();
    stream.extend(&half[..5]);
    let mut decoder = FrameDecoder::new();
    decoder.feed(&stream);
    assert_eq!(
        decoder.next_message::<HostMessage>().unwrap(),
        Some(request(1))
    );
    assert_eq!(
        decoder.next_message::<HostMessage>().unwrap(),
        Some(request(2))
    );
    assert_eq!(decoder.next_message::<HostMessage>().unwrap(), None);
    assert!(decoder.has_partial_frame());
    decoder.feed(&half[5..]);
    assert_eq!(
        decoder.next_message::<HostMessage>().unwrap(),
        Some(request(3))
    );
    assert_eq!(decoder.buffered_len(), 0);
}

#[test]
fn oversize_length_is_rejected_from_the_header_alone() {
    let mut decoder = FrameDecoder::new();
    // Only the header: the error comes before any body byte exists, so nothing can have been
    // allocated for it.
    decoder.feed(&(MAX_FRAME_LEN + 1).to_le_bytes());
    match decoder.next_frame() {
        Err(FrameError::TooLarge { len, max }) => {
            assert_eq!(len, MAX_FRAME_LEN + 1);
            assert_eq!(max, MAX_FRAME_LEN);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(decoder.buffered_len(), 0);
    // u32::MAX as well.
    let mut decoder = FrameDecoder::new();
    decoder.feed(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decoder.next_frame(),
        Err(FrameError::TooLarge { len: u32::MAX, .. })
    ));
}

#[test]
fn decoder_skips_an_oversize_body_and_continues() {
    let mut decoder = FrameDecoder::with_max_len(8);
    let mut stream = 10u32.to_le_bytes().to_vec();
    stream.extend([0xAA; 6]); // part of the oversize body arrives with the header
    decoder.feed(&stream);
    assert!(matches!(
        decoder.next_frame(),
        Err(FrameError::TooLarge { len: 10, max: 8 })
    ));
    assert!(decoder.has_partial_frame(), "still discarding 4 bytes");
    let mut rest = vec![0xAA; 4];
    rest.extend(3u32.to_le_bytes());
    rest.extend([1, 2, 3]);
    decoder.feed(&rest);
    assert_eq!(decoder.next_frame().unwrap(), Some(vec![1, 2, 3]));
    assert!(!decoder.has_partial_frame());
}

#[test]
fn garbage_body_is_an_error_then_the_next_frame_decodes() {
    let mut stream = Vec::new();
    let garbage = [0xFF, 0xFF, 0xFF, 0xFF, 1, 2, 3];
    stream.extend((garbage.len() as u32).to_le_bytes());
    stream.extend(garbage);
    stream.extend(0u32.to_le_bytes()); // empty body: also malformed
                                       // Valid message followed by trailing bytes inside the same frame: rejected.
    let mut trailing = encode_frame(&request(5)).unwrap()[4..].to_vec();
    trailing.push(0);
    stream.extend((trailing.len() as u32).to_le_bytes());
    stream.extend(&trailing);
    stream.extend(encode_frame(&request(6)).unwrap());

    let mut decoder = FrameDecoder::new();
    decoder.feed(&stream);
    for _ in 0..3 {
        assert!(matches!(
            decoder.next_message::<HostMessage>(),
            Err(FrameError::Malformed(_))
        ));
    }
    assert_eq!(
        decoder.next_message::<HostMessage>().unwrap(),
        Some(request(6))
    );
}

#[test]
fn agent_can_answer_a_malformed_request_with_its_id() {
    // A Request frame whose request variant is unknown (e.g. a newer minor version).
    let mut body = 2u32.to_le_bytes().to_vec();
    body.extend(77u64.to_le_bytes());
    body.extend(999u32.to_le_bytes());
    let err = kiln_protocol::decode_body::<HostMessage>(&body).unwrap_err();
    assert!(matches!(err, FrameError::Malformed(_)));
    assert_eq!(kiln_protocol::codec::peek_request_id(&body), Some(77));
}

#[test]
fn blocking_helpers_round_trip_and_report_truncation() {
    let mut wire = Vec::new();
    write_frame(&mut wire, &request(1)).unwrap();
    write_frame(&mut wire, &request(2)).unwrap();
    let mut cursor = Cursor::new(wire.clone());
    assert_eq!(
        read_frame::<_, HostMessage>(&mut cursor).unwrap(),
        request(1)
    );
    assert_eq!(
        read_frame::<_, HostMessage>(&mut cursor).unwrap(),
        request(2)
    );
    assert!(matches!(
        read_frame::<_, HostMessage>(&mut cursor),
        Err(FrameError::Closed)
    ));

    let mut cut = Cursor::new(wire[..10].to_vec());
    assert!(matches!(
        read_frame_body(&mut cut),
        Err(FrameError::Truncated { got: 10, .. })
    ));
    let mut cut = Cursor::new(wire[..2].to_vec());
    assert!(matches!(
        read_frame_body(&mut cut),
        Err(FrameError::Truncated {
            got: 2,
            expected: 4
        })
    ));
    let mut huge = Cursor::new(u32::MAX.to_le_bytes().to_vec());
    assert!(matches!(
        read_frame_body(&mut huge),
        Err(FrameError::TooLarge { .. })
    ));
}

#[test]
fn messages_larger_than_a_frame_are_refused_when_encoding() {
    let msg = HostMessage::Hello(Hello {
        version: ProtocolVersion { major: 1, minor: 0 },
        client: "x".repeat(MAX_FRAME_LEN as usize),
    });
    assert!(matches!(
        encode_frame(&msg),
        Err(FrameError::MessageTooLarge { .. })
    ));
}

#[test]
fn handshake_refuses_another_major_version_clearly() {
    let hello = |major| {
        HostMessage::Hello(Hello {
            version: ProtocolVersion { major, minor: 3 },
            client: "t".into(),
        })
    };
    let ok = encode_frame(&hello(1)).unwrap();
    assert!(matches!(open_connection(&ok[4..]), Ok(Opening::Control(_))));
    let bad = encode_frame(&hello(2)).unwrap();
    let err = open_connection(&bad[4..]).unwrap_err();
    assert_eq!(err.kind, ErrorKind::IncompatibleVersion);
    assert!(err.message.contains("2.3"), "{}", err.message);
    // A major-2 Hello with a body this version cannot parse is still named as version 2.
    let mut alien = bad[4..12].to_vec();
    alien.extend([0xFF; 3]);
    assert_eq!(
        open_connection(&alien).unwrap_err().kind,
        ErrorKind::IncompatibleVersion
    );
    // A request as first frame is a protocol violation; garbage is malformed.
    let req = encode_frame(&request(1)).unwrap();
    assert_eq!(
        open_connection(&req[4..]).unwrap_err().kind,
        ErrorKind::ProtocolViolation
    );
    assert_eq!(
        open_connection(&[9, 9]).unwrap_err().kind,
        ErrorKind::MalformedFrame
    );
    // The reply itself encodes.
    encode_frame(&AgentMessage::Error(err)).unwrap();
}

/// xorshift64*: deterministic pseudo-random bytes without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Random streams (random bytes, mutated valid frames, random chunking) never panic the decoder,
/// never make it hold more than what was fed, and a valid frame after a resync still decodes.
#[test]
fn randomized_streams_never_panic() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let valid = encode_frame(&request(42)).unwrap();
    for round in 0..2000 {
        let mut stream = Vec::new();
        let len = (rng.next() % 300) as usize;
        if round % 2 == 0 {
            stream.extend((0..len).map(|_| rng.next() as u8));
        } else {
            stream.extend(&valid);
            for _ in 0..(rng.next() % 4) {
                let at = (rng.next() as usize) % stream.len();
                stream[at] = rng.next() as u8;
            }
        }
        let mut decoder = FrameDecoder::with_max_len(1024);
        let mut fed = 0;
        let mut rest = &stream[..];
        while !rest.is_empty() {
            let n = 1 + (rng.next() as usize) % rest.len();
            decoder.feed(&rest[..n]);
            fed += n;
            rest = &rest[n..];
            assert!(decoder.buffered_len() <= fed);
            for _ in 0..64 {
                match decoder.next_message::<HostMessage>() {
                    Ok(Some(_)) | Err(_) => continue,
                    Ok(None) => break,
                }
            }
        }
        let _ = kiln_protocol::decode_body::<HostMessage>(&stream);
        let _ = kiln_protocol::decode_body::<AgentMessage>(&stream);
        let _ = open_connection(&stream);
    }
}
