//! The transport's frame decoder on arbitrary bytes, fed in pieces of fuzzer-chosen sizes:
//! messages or a typed error, never a panic; never more buffered than one maximum frame plus
//! what was fed; and every decoded message re-encodes to a frame that decodes to itself.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use transport::wire::{Decoder, encode};

const MAX: u32 = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else {
        return;
    };
    let piece = usize::from(split).max(1);
    let mut d = Decoder::new(MAX);
    for chunk in bytes.chunks(piece) {
        d.feed(chunk);
        loop {
            match d.next_message() {
                Ok(Some(m)) => {
                    let mut out = BytesMut::new();
                    encode(&m, MAX, &mut out).expect("a decoded message re-encodes");
                    let mut again = Decoder::new(MAX);
                    again.feed(&out);
                    assert_eq!(again.next_message(), Ok(Some(m)));
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(d.buffered() <= bytes.len());
    }
});
