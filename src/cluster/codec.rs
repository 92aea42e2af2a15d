//! How the cluster's values are written as bytes (pure): the Raft logs, votes
//! and snapshots on disk, and the requests and replies between nodes.
//! MessagePack (`rmp-serde`, struct fields by name), behind a marker byte
//! that no JSON text starts with, so a store or a peer that wrote JSON (the
//! format before this one) is still read: [`decode`] takes either.
//! MessagePack carries message bodies as bytes where JSON needed base64,
//! and costs a fraction of JSON's encoding and decoding time per entry.
//!
//! A type that writes bytes differently for JSON (base64) and MessagePack
//! (raw) asks `Serializer::is_human_readable`: false here.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// First byte of a MessagePack value written here. 0xc1 is the one byte
/// MessagePack never uses, and JSON text starts with an ASCII byte.
pub const MARKER: u8 = 0xc1;

/// Why bytes could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("{0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("{0}")]
    Decode(#[from] rmp_serde::decode::Error),
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// `value` as MessagePack, after [`MARKER`].
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    encode_after(&[], value)
}

/// `prefix`, then `value` as [`encode`] writes it (a header of the caller's
/// in the same buffer, with no copy of the value behind it).
pub fn encode_after<T: Serialize + ?Sized>(
    prefix: &[u8],
    value: &T,
) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(prefix.len() + 128);
    out.extend_from_slice(prefix);
    out.push(MARKER);
    rmp_serde::encode::write_named(&mut out, value)?;
    Ok(out)
}

/// `value` as [`encode`] writes it, to `out` (a long value written a part
/// at a time, not held whole).
pub fn encode_to<T: Serialize + ?Sized>(
    out: &mut dyn std::io::Write,
    value: &T,
) -> Result<(), CodecError> {
    out.write_all(&[MARKER])?;
    rmp_serde::encode::write_named(out, value)?;
    Ok(())
}

/// A value written by [`encode`], or JSON (what earlier versions wrote).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    match bytes.split_first() {
        Some((&MARKER, rest)) => Ok(rmp_serde::from_slice(rest)?),
        _ => Ok(serde_json::from_slice(bytes)?),
    }
}

/// Reading a value written by [`encode`] from a reader a part at a time,
/// head by head (a long snapshot streamed from its file): each call reads
/// no further than what it returns.
pub mod read {
    use super::MARKER;
    use serde::Deserialize;
    use std::io::BufRead;

    /// An error met reading a snapshot, as these readers word it.
    pub fn err(e: impl std::fmt::Display) -> String {
        format!("reading a snapshot: {e}")
    }

    /// Whether the next byte is the [`MARKER`] (without reading it).
    pub fn at_marker(r: &mut dyn BufRead) -> Result<bool, String> {
        Ok(r.fill_buf().map_err(err)?.first() == Some(&MARKER))
    }

    /// The [`MARKER`] a value starts with.
    pub fn marker(r: &mut dyn BufRead) -> Result<(), String> {
        let mut b = [0u8];
        r.read_exact(&mut b).map_err(err)?;
        match b[0] {
            MARKER => Ok(()),
            other => Err(err(format!("0x{other:02x} where its marker belongs"))),
        }
    }

    /// One value of type `T` (`serde::de::IgnoredAny` to skip one).
    pub fn value<T: for<'de> Deserialize<'de>>(r: &mut dyn BufRead) -> Result<T, String> {
        T::deserialize(&mut rmp_serde::Deserializer::new(r)).map_err(err)
    }

    /// A map's length (a struct's fields, by name).
    pub fn map_len(mut r: &mut dyn BufRead) -> Result<u32, String> {
        rmp::decode::read_map_len(&mut r).map_err(err)
    }

    /// A byte string's length (its bytes follow).
    pub fn bin_len(mut r: &mut dyn BufRead) -> Result<u32, String> {
        rmp::decode::read_bin_len(&mut r).map_err(err)
    }

    /// A string (a field's name).
    pub fn key(mut r: &mut dyn BufRead) -> Result<Vec<u8>, String> {
        let n = rmp::decode::read_str_len(&mut r).map_err(err)?;
        let mut k = vec![0u8; n as usize];
        r.read_exact(&mut k).map_err(err)?;
        Ok(k)
    }
}

/// Bytes as base64 in JSON and as raw bytes in MessagePack, read back from
/// either (`#[serde(with = "crate::cluster::codec::bytes")]`).
pub mod bytes {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
        } else {
            s.serialize_bytes(v)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<::bytes::Bytes, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            base64::engine::general_purpose::STANDARD
                .decode(s.as_bytes())
                .map(::bytes::Bytes::from)
                .map_err(serde::de::Error::custom)
        } else {
            let b = serde_bytes::ByteBuf::deserialize(d)?;
            Ok(::bytes::Bytes::from(b.into_vec()))
        }
    }
}

/// openraft's `InstallSnapshotRequest` with its chunk's data as one
/// MessagePack bin (`#[serde(with = "crate::cluster::codec::snapshot_chunk")]`):
/// its own derive writes the `Vec<u8>` as an array of integers, two bytes for
/// each byte above 127 and a call per byte to read back. The same fields by
/// the same names otherwise.
pub mod snapshot_chunk {
    use openraft::raft::InstallSnapshotRequest;
    use openraft::{RaftTypeConfig, SnapshotMeta, Vote};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize)]
    #[serde(bound = "")]
    struct Out<'a, C: RaftTypeConfig> {
        vote: &'a Vote<C::NodeId>,
        meta: &'a SnapshotMeta<C::NodeId, C::Node>,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: &'a [u8],
        done: bool,
    }

    #[derive(Deserialize)]
    #[serde(bound = "")]
    struct In<C: RaftTypeConfig> {
        vote: Vote<C::NodeId>,
        meta: SnapshotMeta<C::NodeId, C::Node>,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        done: bool,
    }

    pub fn serialize<C: RaftTypeConfig, S: Serializer>(
        r: &InstallSnapshotRequest<C>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        Out::<C> {
            vote: &r.vote,
            meta: &r.meta,
            offset: r.offset,
            data: &r.data,
            done: r.done,
        }
        .serialize(s)
    }

    pub fn deserialize<'de, C: RaftTypeConfig, D: Deserializer<'de>>(
        d: D,
    ) -> Result<InstallSnapshotRequest<C>, D::Error> {
        let r = In::<C>::deserialize(d)?;
        Ok(InstallSnapshotRequest {
            vote: r.vote,
            meta: r.meta,
            offset: r.offset,
            data: r.data,
            done: r.done,
        })
    }

    /// A request on its own (the metadata group's frames carry one).
    pub struct Chunk<C: RaftTypeConfig>(pub InstallSnapshotRequest<C>);

    impl<C: RaftTypeConfig> Serialize for Chunk<C> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            serialize(&self.0, s)
        }
    }

    impl<'de, C: RaftTypeConfig> Deserialize<'de> for Chunk<C> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            deserialize(d).map(Chunk)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct T {
        name: String,
        #[serde(with = "bytes")]
        body: ::bytes::Bytes,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        n: Option<u64>,
    }

    #[test]
    fn values_round_trip_and_json_is_still_read() {
        let t = T {
            name: "q".into(),
            body: ::bytes::Bytes::from_static(&[0, 1, 255, 7]),
            n: None,
        };
        let bin = encode(&t).expect("encodes");
        assert_eq!(bin[0], MARKER);
        let after = encode_after(b"head", &t).expect("encodes");
        assert_eq!(after[..4], *b"head");
        assert_eq!(after[4..], bin[..]);
        // Raw bytes, not base64: the body's four bytes follow a bin8 header.
        assert!(bin.windows(6).any(|w| w == [0xc4, 4, 0, 1, 255, 7]));
        assert_eq!(decode::<T>(&bin).expect("decodes"), t);
        let json = serde_json::to_vec(&t).expect("json");
        assert!(String::from_utf8_lossy(&json).contains("\"AAH/Bw==\""));
        assert_eq!(decode::<T>(&json).expect("json decodes"), t);
        // A field skipped when empty (a map by name, not a tuple by place).
        let with_n = T { n: Some(3), ..t };
        assert_eq!(
            decode::<T>(&encode(&with_n).expect("encodes")).ok(),
            Some(with_n)
        );
    }

    #[test]
    fn a_snapshot_chunk_carries_its_data_as_one_bin() {
        use openraft::raft::InstallSnapshotRequest;
        let req = InstallSnapshotRequest::<crate::cluster::TypeConfig> {
            vote: openraft::Vote::new(3, 1),
            meta: openraft::SnapshotMeta {
                last_log_id: Some(openraft::LogId::new(
                    openraft::CommittedLeaderId::new(3, 1),
                    9,
                )),
                last_membership: Default::default(),
                snapshot_id: "s-9".into(),
            },
            offset: 1 << 20,
            data: (0..4096u32).map(|i| (i * 7) as u8).collect(),
            done: true,
        };
        let plain = encode(&req).expect("encodes");
        let bin = encode(&snapshot_chunk::Chunk(req.clone())).expect("encodes");
        // The data's 4096 bytes after a bin16 header, where the derive
        // writes half of them (those above 127) in two bytes.
        assert!(bin.windows(3).any(|w| w == [0xc5, 0x10, 0x00]));
        assert!(bin.len() < 4096 + 200, "{}", bin.len());
        assert!(plain.len() > 4096 + 1500, "{}", plain.len());
        let back: snapshot_chunk::Chunk<crate::cluster::TypeConfig> =
            decode(&bin).expect("decodes");
        assert_eq!(back.0, req);
    }

    #[test]
    fn bad_bytes_are_an_error() {
        assert!(decode::<T>(&[MARKER]).is_err());
        assert!(decode::<T>(&[MARKER, 0x93, 1]).is_err());
        assert!(decode::<T>(b"{").is_err());
        assert!(decode::<T>(&[]).is_err());
        assert!(
            decode::<Option<u64>>(&encode(&None::<u64>).expect("encodes"))
                .expect("decodes")
                .is_none()
        );
    }
}
