//! Arbitrary bytes through the client frame decoder, as a text frame (JSON)
//! and as a binary frame (MessagePack): `decode_client` never panics, never
//! allocates without bound (the runs set `-malloc_limit_mb`), and whatever
//! it accepts re-encodes to a frame that decodes to the same event.
//!
//! The bus envelope decoder lives in the gateway, not in `shared`, and is
//! not reachable from here.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::codec::{decode_client, encode, Encoding};

fuzz_target!(|data: &[u8]| {
    for encoding in [Encoding::Json, Encoding::MsgPack] {
        if let Ok(frame) = decode_client(data, encoding) {
            let bytes = encode(&frame, encoding).expect("a decoded frame encodes");
            let again = decode_client(&bytes, encoding).expect("a re-encoded frame decodes");
            assert_eq!(again, frame, "{encoding:?} round trip");
        }
    }
});
