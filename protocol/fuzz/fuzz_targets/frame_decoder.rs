//! Feeds arbitrary bytes, split at fuzzer-chosen points, through `FrameDecoder` and decodes every
//! frame as both message enums. Must never panic, and the decoder must never hold more bytes than
//! it was fed; any message that decodes must survive a re-encode / decode round trip (bodies are not
//! always canonical: a map with unsorted or repeated keys decodes to a normalized map).
#![no_main]

use kiln_protocol::{decode_body, encode_body, AgentMessage, FrameDecoder, HostMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // First byte: chunk size for the partial reads; first bit of the second: decoder limit.
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut decoder = if rest.first().is_some_and(|b| b & 1 == 1) {
        FrameDecoder::with_max_len(256)
    } else {
        FrameDecoder::new()
    };
    let mut fed = 0;
    for piece in rest.chunks(chunk) {
        decoder.feed(piece);
        fed += piece.len();
        assert!(decoder.buffered_len() <= fed);
        loop {
            match decoder.next_frame() {
                Ok(Some(body)) => {
                    if let Ok(msg) = decode_body::<HostMessage>(&body) {
                        let again = encode_body(&msg).unwrap();
                        assert_eq!(decode_body::<HostMessage>(&again).unwrap(), msg);
                    }
                    if let Ok(msg) = decode_body::<AgentMessage>(&body) {
                        let again = encode_body(&msg).unwrap();
                        assert_eq!(decode_body::<AgentMessage>(&again).unwrap(), msg);
                    }
                }
                Ok(None) => break,
                Err(_) => continue,
            }
        }
    }
});
