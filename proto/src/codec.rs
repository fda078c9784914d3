//! The protobuf codec every Weft service and client uses: prost's, with a
//! smaller encode buffer.
//!
//! tonic encodes a stream's messages into one buffer and keeps what is left
//! of it for the stream's life. With its defaults (8 KiB, grown until 32 KiB
//! are queued) a long-lived stream holds 32-64 KiB after a burst; a server
//! with thousands of WatchPeers streams holds that for each. Yielding at
//! 8 KiB keeps a stream to its first 8 KiB when messages (snapshot pages
//! included) are smaller than that.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Bytes encoded before a buffer is handed to the transport.
pub const YIELD_THRESHOLD: usize = 8 * 1024;
/// The encode buffer's starting size.
pub const BUFFER_SIZE: usize = 8 * 1024;

/// prost's codec with [`BUFFER_SIZE`] and [`YIELD_THRESHOLD`] for encoding.
#[derive(Debug, Clone, Copy)]
pub struct WeftCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for WeftCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> Codec for WeftCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::default())
    }
}
