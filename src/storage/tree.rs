//! Writing a set of key changes to one sled tree as one atomic write, at the
//! fewest syncs: the message store's group flushes and the Raft logs' stores
//! (`crate::cluster::disk`) both write this way.

use ::sled::{Batch, Tree};

/// Make `changes` (a value to put, or None to remove) to `tree`, as one
/// atomic write. sled 0.34's `apply_batch` writes its batch between two log
/// buffers of its own, each written and synced apart (a `pwrite` and a
/// `sync_file_range` each, on sled's thread pool, at every batch; measured,
/// two to three syncs per quorum commit and two per message-store flush).
/// So a single change is made alone (atomic by itself), and so are the
/// changes of an `append` (Raft log entries in index order, nothing removed:
/// sled recovers a prefix of its log, and a prefix of an append not yet
/// acknowledged is a shorter append); only the rest goes in a batch.
pub fn apply_changes<I>(tree: &Tree, changes: I, append: bool) -> ::sled::Result<()>
where
    I: IntoIterator<Item = (Vec<u8>, Option<Vec<u8>>)>,
    I::IntoIter: ExactSizeIterator,
{
    let changes = changes.into_iter();
    if changes.len() <= 1 || append {
        for (k, v) in changes {
            match v {
                Some(v) => drop(tree.insert(k, v)?),
                None => drop(tree.remove(k)?),
            }
        }
        return Ok(());
    }
    let mut batch = Batch::default();
    for (k, v) in changes {
        match v {
            Some(v) => batch.insert(k, v),
            None => batch.remove(k),
        }
    }
    tree.apply_batch(batch)
}
