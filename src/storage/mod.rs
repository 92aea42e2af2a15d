//! Durable storage for the broker: the public API of the message and
//! topology store (types, errors, data-directory layout).
//!
//! The implementation lives in [`sled`](self::sled) (the [`Store`] handle, its
//! group-commit flusher thread and recovery); the byte formats live in
//! [`codec`]. This module depends on nothing else in the broker: message
//! properties and topology records are opaque bytes encoded by the caller.
//!
//! # Data directory layout
//!
//! ```text
//! <data_dir>/
//!   VERSION        "warren-store 3" — the store format; any other value is refused
//!   store/         the sled database (one write-ahead log + snapshots), with trees:
//!                    topology   "<kind>/<key>" -> caller's record
//!                               (kind = vhost|user|exchange|queue|binding|permission|policy)
//!                    segments   metas of durable queues' chunks (segment.rs has the
//!                               key and record formats)
//!                    ephemeral  the same for non-durable queues' paged-out messages;
//!                               dropped at every open
//!                  and, in the default tree, "epoch": a counter bumped at every open
//!   store-data/    NNNNNNNNNNNNNNNN.seg: append-only files of chunk bytes of durable
//!                  queues, pointed at by the metas (files.rs)
//!   store-ephemeral/  the same for non-durable queues' pages; emptied at every open
//! ```
//!
//! docs/storage.md describes the design (chunks, metas, compaction, recovery,
//! the memory model). To back up, stop the broker and copy the whole data
//! directory. To start from scratch, stop the broker and remove it.
//!
//! # Durability contract
//!
//! * `put_topology`/`delete_topology` are applied at once (visible to
//!   `load_topology` immediately) and made durable by the next group flush;
//!   await [`Store::sync`] before answering e.g. `queue.declare-ok` if the
//!   declare must survive a crash.
//! * [`Store::submit`] buffers operations that the flusher thread applies in
//!   call order. Buffering never blocks; producers await [`Store::ready`] for
//!   back-pressure. They are durable once a later [`Store::sync`] resolves or
//!   an [`Store::on_durable`] callback runs; that is the moment to send a
//!   publisher confirm. [`Store::read`] sees buffered operations too.

mod codec;
mod files;
mod group;
mod read;
mod segment;
mod sled;
pub mod stream;
mod tree;

use std::path::PathBuf;

pub use self::read::{LevelSummary, ReadMessage};
pub use self::sled::{EncodedMessage, MessageOp, QueueRef, Store, StoreOptions};
pub use self::tree::apply_changes;
pub use codec::{decode_message, encode_message, encode_parts, MessageParts, RECORD_VERSION};

/// The content of `<data_dir>/VERSION` written and accepted by this build.
pub const STORE_VERSION: &str = "warren-store 3";

/// A message as persisted on a durable queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub exchange: String,
    pub routing_key: String,
    /// Opaque: encoded (and decoded) by the caller.
    pub properties: bytes::Bytes,
    pub body: bytes::Bytes,
    pub redelivered: bool,
    /// Opaque to the store (e.g. a per-message TTL deadline in ms since the epoch).
    pub expires_at: Option<u64>,
}

#[derive(thiserror::Error, Debug, Clone)]
pub enum StorageError {
    #[error("cannot open the message store at {path}: {source}")]
    Open {
        path: PathBuf,
        source: ::sled::Error,
    },
    #[error("the message store at {path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("storage I/O error: {0}")]
    Io(#[from] ::sled::Error),
    /// The store's flusher thread has stopped (the store was shut down, or it
    /// panicked); nothing more can be made durable.
    #[error("the message store at {path} is shut down")]
    Closed { path: PathBuf },
}

/// Kinds of durable topology records. Each record is stored under the key
/// `"<kind>/<key>"` in the `topology` tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopologyKind {
    VHost,
    User,
    Exchange,
    Queue,
    Binding,
    Permission,
    Policy,
    /// Runtime parameters other than policies and limits (shovels).
    Parameter,
}

impl TopologyKind {
    pub const ALL: [TopologyKind; 8] = [
        TopologyKind::VHost,
        TopologyKind::User,
        TopologyKind::Exchange,
        TopologyKind::Queue,
        TopologyKind::Binding,
        TopologyKind::Permission,
        TopologyKind::Policy,
        TopologyKind::Parameter,
    ];

    /// The name used in the on-disk key (`"<name>/<key>"`).
    pub fn as_str(self) -> &'static str {
        match self {
            TopologyKind::VHost => "vhost",
            TopologyKind::User => "user",
            TopologyKind::Exchange => "exchange",
            TopologyKind::Queue => "queue",
            TopologyKind::Binding => "binding",
            TopologyKind::Permission => "permission",
            TopologyKind::Policy => "policy",
            TopologyKind::Parameter => "parameter",
        }
    }
}

/// Counters for monitoring; cheap to read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Message inserts applied to the database by the flusher.
    pub messages_written: u64,
    /// Group flushes (one fsync'd `db.flush()` each) performed by the flusher.
    pub flushes: u64,
    /// sled's `size_on_disk` (0 if it could not be read) plus the bytes of
    /// the data files.
    pub bytes_on_disk: u64,
}
