//! Host-guest protocol of kiln (see issue 3): length-prefixed bincode frames over any byte stream.
#![forbid(unsafe_code)]
