//! The durable Raft log: `raft::Storage` over one redb file, `<dir>/raft.redb`.
//!
//! Layout (format version [`FORMAT_VERSION`]):
//!
//! | table | key | value |
//! |---|---|---|
//! | `meta` | `"format_version"` | u32 little-endian; an unknown value refuses to open |
//! | `meta` | `"node_id"` | u64 LE: the Raft id this directory belongs to |
//! | `meta` | `"incarnation"` | u64 LE, bumped at every open (tags proposals, see `node`) |
//! | `meta` | `"hard_state"` | protobuf `eraftpb::HardState` (term, vote, commit) |
//! | `meta` | `"conf_state"` | protobuf `eraftpb::ConfState` as of the last applied conf change |
//! | `meta` | `"truncated"` | index and term (u64 LE each) of the last discarded entry |
//! | `entries` | index (u64) | protobuf `eraftpb::Entry`, indexes `truncated + 1 ..= last` |
//! | `snapshot` | `"metadata"` | protobuf `eraftpb::SnapshotMetadata` of the last snapshot |
//! | `snapshot` | `"data"` | its bytes (a versioned state-machine image, see `node`) |
//!
//! Every mutation is one redb write transaction committed with `Durability::Immediate`
//! (fsync'd before the call returns). [`RedbStorage::persist_ready`] writes a whole Ready
//! (snapshot, entries, hard state) in a single transaction. Reads go to redb; the small records
//! (hard state, conf state, truncation point, last index, snapshot metadata) are cached.
//!
//! A commit index that needs no fsync of its own ([`RedbStorage::set_commit`]: from a LightReady,
//! or a Ready whose only change it is, `must_sync` false) is kept in memory and written with the
//! next transaction; raft-rs does not require it to be durable (a restarted node learns it again),
//! and every transaction that takes a snapshot or discards entries writes it, so a reopened
//! store never has `commit < truncated index`.
//!
//! Invariants: `snapshot.index >= truncated.index` (entries are discarded only when a stored
//! snapshot covers them), `commit <= last index`, and entries are contiguous.

use std::cell::Cell;
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError as RaftStorageError};
use redb::{
    Builder, ConcurrencyMode, Database, Durability, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, TableDefinition, TableHandle, WriteTransaction,
};

/// The on-disk format written by this version.
pub const FORMAT_VERSION: u32 = 1;

/// The file name under the node's directory.
pub const DB_FILE: &str = "raft.redb";

/// Small records: format version, node id, incarnation, hard state, conf state, truncation.
pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// The log: index -> protobuf `Entry`.
pub const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
/// The last snapshot: `"metadata"` and `"data"`.
pub const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

const KEY_VERSION: &str = "format_version";
const KEY_NODE_ID: &str = "node_id";
const KEY_INCARNATION: &str = "incarnation";
const KEY_HARD_STATE: &str = "hard_state";
const KEY_CONF_STATE: &str = "conf_state";
const KEY_TRUNCATED: &str = "truncated";
const KEY_SNAP_META: &str = "metadata";
const KEY_SNAP_DATA: &str = "data";

/// Why the log store failed. Every variant names the database file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("raft log {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: redb::Error,
    },
    #[error("raft log {path}: creating the directory: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "raft log {path}: format version {found} is not supported (this program reads version {supported}); \
         upgrade strata or restore the directory from a backup"
    )]
    UnknownFormatVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("raft log {path}: the file holds tables but no format version: not a strata raft log")]
    NotARaftLog { path: PathBuf },
    #[error("raft log {path}: belongs to raft node {stored}, opened as node {requested}")]
    WrongNode {
        path: PathBuf,
        stored: u64,
        requested: u64,
    },
    #[error("raft log {path}: corrupt record {what}: {message}")]
    Corrupt {
        path: PathBuf,
        what: String,
        message: String,
    },
    #[error("raft log {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Options for opening the store.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreOptions {
    /// Open in redb's `SingleWriter` mode: other handles may read the file while it is open.
    pub shared_readers: bool,
    /// Keep everything in memory (nothing is written under `dir`).
    pub in_memory: bool,
}

/// What [`RedbStorage::open`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenInfo {
    /// The file was created (or held no tables) and was initialised empty.
    pub created: bool,
    /// The incarnation number of this open (1 for the first).
    pub incarnation: u64,
}

/// `raft::Storage` on redb. See the module documentation for the layout.
pub struct RedbStorage {
    db: Database,
    path: PathBuf,
    hard_state: HardState,
    conf_state: ConfState,
    truncated_index: u64,
    truncated_term: u64,
    last_index: u64,
    snapshot_meta: SnapshotMetadata,
    /// Set by [`Storage::snapshot`] when the stored snapshot cannot serve a follower (too old,
    /// or its configuration lacks that follower): the node should take a fresh one.
    snapshot_wanted: Cell<bool>,
}

type DbResult<T> = Result<T, redb::Error>;

impl RedbStorage {
    /// Opens `<dir>/raft.redb` for node `node_id`, creating the directory and an empty store if
    /// needed. Refuses a store of another node or of an unknown format version. Bumps the
    /// incarnation number (durably).
    pub fn open(
        dir: &Path,
        node_id: u64,
        options: StoreOptions,
    ) -> Result<(RedbStorage, OpenInfo), StoreError> {
        let path = dir.join(DB_FILE);
        if !options.in_memory {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let mut builder = Builder::new();
        if options.shared_readers {
            builder.set_concurrency_mode(ConcurrencyMode::SingleWriter);
        }
        let db = if options.in_memory {
            builder.create_with_backend(redb::backends::InMemoryBackend::new())
        } else {
            builder.create(&path)
        };
        let db = db.map_err(|e| StoreError::Db {
            path: path.clone(),
            source: e.into(),
        })?;
        let mut store = RedbStorage {
            db,
            path,
            hard_state: HardState::default(),
            conf_state: ConfState::default(),
            truncated_index: 0,
            truncated_term: 0,
            last_index: 0,
            snapshot_meta: SnapshotMetadata::default(),
            snapshot_wanted: Cell::new(false),
        };
        let info = store.load(node_id)?;
        Ok((store, info))
    }

    /// Reads (or initialises) the records in one durable write transaction.
    fn load(&mut self, node_id: u64) -> Result<OpenInfo, StoreError> {
        let txn = self.begin()?;
        let (created, incarnation) = {
            let mut meta = txn.open_table(META).map_err(|e| self.db_err(e))?;
            let version = meta
                .get(KEY_VERSION)
                .map_err(|e| self.db_err(e))?
                .map(|v| v.value().to_vec());
            let created = match version {
                None => {
                    let others = txn
                        .list_tables()
                        .map_err(|e| self.db_err(e))?
                        .filter(|t| t.name() != META.name())
                        .count();
                    if others > 0 || meta.len().map_err(|e| self.db_err(e))? > 0 {
                        return Err(StoreError::NotARaftLog {
                            path: self.path.clone(),
                        });
                    }
                    meta.insert(KEY_VERSION, &FORMAT_VERSION.to_le_bytes()[..])
                        .map_err(|e| self.db_err(e))?;
                    meta.insert(KEY_NODE_ID, &node_id.to_le_bytes()[..])
                        .map_err(|e| self.db_err(e))?;
                    true
                }
                Some(v) => {
                    let found =
                        decode_u32(&v).ok_or_else(|| self.corrupt(KEY_VERSION, "not 4 bytes"))?;
                    if found != FORMAT_VERSION {
                        return Err(StoreError::UnknownFormatVersion {
                            path: self.path.clone(),
                            found,
                            supported: FORMAT_VERSION,
                        });
                    }
                    false
                }
            };
            let stored = match meta.get(KEY_NODE_ID).map_err(|e| self.db_err(e))? {
                Some(v) => {
                    decode_u64(v.value()).ok_or_else(|| self.corrupt(KEY_NODE_ID, "not 8 bytes"))?
                }
                None => return Err(self.corrupt(KEY_NODE_ID, "missing")),
            };
            if stored != node_id {
                return Err(StoreError::WrongNode {
                    path: self.path.clone(),
                    stored,
                    requested: node_id,
                });
            }
            let previous = match meta.get(KEY_INCARNATION).map_err(|e| self.db_err(e))? {
                Some(v) => decode_u64(v.value())
                    .ok_or_else(|| self.corrupt(KEY_INCARNATION, "not 8 bytes"))?,
                None => 0,
            };
            let incarnation = previous + 1;
            meta.insert(KEY_INCARNATION, &incarnation.to_le_bytes()[..])
                .map_err(|e| self.db_err(e))?;

            if let Some(v) = meta.get(KEY_HARD_STATE).map_err(|e| self.db_err(e))? {
                self.hard_state = self.decode(KEY_HARD_STATE, v.value())?;
            }
            if let Some(v) = meta.get(KEY_CONF_STATE).map_err(|e| self.db_err(e))? {
                self.conf_state = self.decode(KEY_CONF_STATE, v.value())?;
            }
            if let Some(v) = meta.get(KEY_TRUNCATED).map_err(|e| self.db_err(e))? {
                let bytes = v.value();
                match (
                    bytes.get(..8).and_then(decode_u64),
                    bytes.get(8..).and_then(decode_u64),
                ) {
                    (Some(index), Some(term)) => {
                        self.truncated_index = index;
                        self.truncated_term = term;
                    }
                    _ => return Err(self.corrupt(KEY_TRUNCATED, "not 16 bytes")),
                }
            }
            (created, incarnation)
        };
        {
            let snap = txn.open_table(SNAPSHOT).map_err(|e| self.db_err(e))?;
            if let Some(v) = snap.get(KEY_SNAP_META).map_err(|e| self.db_err(e))? {
                self.snapshot_meta = self.decode(KEY_SNAP_META, v.value())?;
            }
            let entries = txn.open_table(ENTRIES).map_err(|e| self.db_err(e))?;
            self.last_index = match entries.last().map_err(|e| self.db_err(e))? {
                Some((k, _)) => k.value(),
                None => self.truncated_index,
            };
            if let Some((k, _)) = entries.first().map_err(|e| self.db_err(e))?
                && k.value() != self.truncated_index + 1
            {
                return Err(self.corrupt(
                    "entries",
                    &format!(
                        "first entry {} does not follow the truncation point {}",
                        k.value(),
                        self.truncated_index
                    ),
                ));
            }
        }
        self.commit_txn(txn)?;
        Ok(OpenInfo {
            created,
            incarnation,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when the store holds no configuration, log or snapshot: a brand-new node.
    pub fn is_empty(&self) -> bool {
        self.conf_state == ConfState::default()
            && self.last_index == 0
            && self.snapshot_meta.index == 0
    }

    /// The cached hard state (term, vote, commit).
    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// The configuration as of the last applied conf change or snapshot.
    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    /// Metadata of the stored snapshot (index 0: none).
    pub fn snapshot_metadata(&self) -> &SnapshotMetadata {
        &self.snapshot_meta
    }

    /// The stored snapshot's bytes (empty when there is none).
    pub fn snapshot_data(&self) -> Result<Vec<u8>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = match txn.open_table(SNAPSHOT) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.db_err(e)),
        };
        Ok(table
            .get(KEY_SNAP_DATA)
            .map_err(|e| self.db_err(e))?
            .map(|v| v.value().to_vec())
            .unwrap_or_default())
    }

    /// Makes a brand-new store the first member of a new cluster: stores a snapshot at index 1,
    /// term 1, with `voters` as the configuration and `data` as the state machine's initial
    /// image. Every initial voter is bootstrapped identically; the log starts at index 2, so a
    /// node added later always starts from a snapshot (which carries the configuration).
    pub fn bootstrap(&mut self, voters: &[u64], data: Vec<u8>) -> Result<(), StoreError> {
        if !self.is_empty() {
            return Err(self.invalid("bootstrap of a store that already holds state".into()));
        }
        let mut snapshot = Snapshot::default();
        let meta = snapshot.mut_metadata();
        meta.index = 1;
        meta.term = 1;
        meta.mut_conf_state().voters = voters.to_vec();
        snapshot.data = data.into();
        self.apply_snapshot(snapshot)
    }

    /// Persists one Ready in a single durable transaction: first the snapshot (which replaces
    /// the log), then the entries (overwriting any conflicting suffix), then the hard state.
    pub fn persist_ready(
        &mut self,
        snapshot: Option<&Snapshot>,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<(), StoreError> {
        if snapshot.is_none() && entries.is_empty() && hard_state.is_none() {
            return Ok(());
        }
        let txn = self.begin()?;
        if let Some(snapshot) = snapshot {
            self.write_snapshot(&txn, snapshot, true)?;
        }
        if !entries.is_empty() {
            self.write_entries(&txn, entries)?;
        }
        if let Some(hs) = hard_state {
            self.hard_state = hs.clone();
        }
        self.write_hard_state(&txn)?;
        self.commit_txn(txn)
    }

    /// Appends entries, discarding any stored entries at or after the first new index.
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        self.persist_ready(None, entries, None)
    }

    /// Persists the hard state.
    pub fn set_hardstate(&mut self, hs: HardState) -> Result<(), StoreError> {
        self.persist_ready(None, &[], Some(&hs))
    }

    /// Records a commit index reported outside a Ready; written with the next transaction.
    pub fn set_commit(&mut self, commit: u64) {
        if commit > self.hard_state.commit {
            self.hard_state.commit = commit;
        }
    }

    /// Persists the configuration after a conf change was applied.
    pub fn set_conf_state(&mut self, cs: ConfState) -> Result<(), StoreError> {
        let txn = self.begin()?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.db_err(e))?;
            let bytes = self.encode(KEY_CONF_STATE, &cs)?;
            meta.insert(KEY_CONF_STATE, bytes.as_slice())
                .map_err(|e| self.db_err(e))?;
        }
        self.conf_state = cs;
        self.write_hard_state(&txn)?;
        self.commit_txn(txn)
    }

    /// Replaces the whole log with a snapshot received from the leader (or the bootstrap one):
    /// every entry is discarded, the conf state comes from the snapshot, the commit index moves
    /// to the snapshot's index.
    pub fn apply_snapshot(&mut self, snapshot: Snapshot) -> Result<(), StoreError> {
        let txn = self.begin()?;
        self.write_snapshot(&txn, &snapshot, true)?;
        self.write_hard_state(&txn)?;
        self.commit_txn(txn)
    }

    /// Stores a snapshot this node took of its own state machine at `index` (applied, hence
    /// committed and in the log), with the configuration as of `index`. The log is kept.
    pub fn create_snapshot(
        &mut self,
        index: u64,
        conf_state: ConfState,
        data: Vec<u8>,
    ) -> Result<SnapshotMetadata, StoreError> {
        if index < self.snapshot_meta.index {
            return Err(self.invalid(format!(
                "snapshot at {index} is older than the stored one at {}",
                self.snapshot_meta.index
            )));
        }
        if index > self.hard_state.commit {
            return Err(self.invalid(format!(
                "snapshot at {index} beyond the commit index {}",
                self.hard_state.commit
            )));
        }
        let term = self
            .term(index)
            .map_err(|e| self.invalid(format!("snapshot at {index}: no term: {e}")))?;
        let mut snapshot = Snapshot::default();
        let meta = snapshot.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(conf_state);
        snapshot.data = data.into();
        let txn = self.begin()?;
        self.write_snapshot(&txn, &snapshot, false)?;
        self.write_hard_state(&txn)?;
        self.commit_txn(txn)?;
        self.snapshot_wanted.set(false);
        Ok(snapshot.take_metadata())
    }

    /// Discards the entries before `compact_index` (they stay reachable through the stored
    /// snapshot). Compacting below the first index is a no-op; past the stored snapshot, or past
    /// the last entry, an error.
    pub fn compact(&mut self, compact_index: u64) -> Result<(), StoreError> {
        if compact_index <= self.first_index_value() {
            return Ok(());
        }
        let new_truncated = compact_index - 1;
        if new_truncated > self.snapshot_meta.index {
            return Err(self.invalid(format!(
                "compacting to {compact_index} would discard entries after the stored snapshot at {}",
                self.snapshot_meta.index
            )));
        }
        if new_truncated > self.last_index {
            return Err(self.invalid(format!(
                "compacting to {compact_index} past the last entry {}",
                self.last_index
            )));
        }
        let term = self
            .term(new_truncated)
            .map_err(|e| self.invalid(format!("compacting to {compact_index}: {e}")))?;
        let txn = self.begin()?;
        {
            let mut entries = txn.open_table(ENTRIES).map_err(|e| self.db_err(e))?;
            entries
                .retain_in(..compact_index, |_, _| false)
                .map_err(|e| self.db_err(e))?;
        }
        self.truncated_index = new_truncated;
        self.truncated_term = term;
        self.write_truncated(&txn)?;
        self.write_hard_state(&txn)?;
        self.commit_txn(txn)
    }

    /// True (once) when raft asked for a snapshot the store could not serve.
    pub fn take_snapshot_wanted(&self) -> bool {
        self.snapshot_wanted.replace(false)
    }

    fn first_index_value(&self) -> u64 {
        self.truncated_index + 1
    }

    fn write_snapshot(
        &mut self,
        txn: &WriteTransaction,
        snapshot: &Snapshot,
        replaces_log: bool,
    ) -> Result<(), StoreError> {
        let meta = snapshot.get_metadata();
        {
            let mut table = txn.open_table(SNAPSHOT).map_err(|e| self.db_err(e))?;
            let bytes = self.encode(KEY_SNAP_META, meta)?;
            table
                .insert(KEY_SNAP_META, bytes.as_slice())
                .map_err(|e| self.db_err(e))?;
            table
                .insert(KEY_SNAP_DATA, &snapshot.data[..])
                .map_err(|e| self.db_err(e))?;
        }
        self.snapshot_meta = meta.clone();
        if replaces_log {
            {
                let mut entries = txn.open_table(ENTRIES).map_err(|e| self.db_err(e))?;
                entries.retain(|_, _| false).map_err(|e| self.db_err(e))?;
            }
            self.truncated_index = meta.index;
            self.truncated_term = meta.term;
            self.last_index = meta.index;
            self.write_truncated(txn)?;
            self.conf_state = meta.get_conf_state().clone();
            {
                let mut table = txn.open_table(META).map_err(|e| self.db_err(e))?;
                let bytes = self.encode(KEY_CONF_STATE, &self.conf_state)?;
                table
                    .insert(KEY_CONF_STATE, bytes.as_slice())
                    .map_err(|e| self.db_err(e))?;
            }
            self.hard_state.term = self.hard_state.term.max(meta.term);
            self.hard_state.commit = meta.index;
        }
        Ok(())
    }

    fn write_entries(
        &mut self,
        txn: &WriteTransaction,
        entries: &[Entry],
    ) -> Result<(), StoreError> {
        let first_new = entries[0].index;
        if first_new <= self.truncated_index {
            return Err(self.invalid(format!(
                "append at {first_new} overwrites compacted entries (truncated at {})",
                self.truncated_index
            )));
        }
        if first_new > self.last_index + 1 {
            return Err(self.invalid(format!(
                "append at {first_new} leaves a gap after the last entry {}",
                self.last_index
            )));
        }
        let mut table = txn.open_table(ENTRIES).map_err(|e| self.db_err(e))?;
        if first_new <= self.last_index {
            // A new leader overwrote a conflicting suffix: drop it entirely, the new entries
            // may be fewer than the old ones.
            table
                .retain_in(first_new.., |_, _| false)
                .map_err(|e| self.db_err(e))?;
        }
        let mut expected = first_new;
        for entry in entries {
            if entry.index != expected {
                return Err(self.invalid(format!(
                    "entries not contiguous: {} where {expected} was expected",
                    entry.index
                )));
            }
            let bytes = self.encode("entry", entry)?;
            table
                .insert(entry.index, bytes.as_slice())
                .map_err(|e| self.db_err(e))?;
            expected += 1;
        }
        self.last_index = expected - 1;
        Ok(())
    }

    fn write_hard_state(&self, txn: &WriteTransaction) -> Result<(), StoreError> {
        let mut meta = txn.open_table(META).map_err(|e| self.db_err(e))?;
        let bytes = self.encode(KEY_HARD_STATE, &self.hard_state)?;
        meta.insert(KEY_HARD_STATE, bytes.as_slice())
            .map_err(|e| self.db_err(e))?;
        Ok(())
    }

    fn write_truncated(&self, txn: &WriteTransaction) -> Result<(), StoreError> {
        let mut meta = txn.open_table(META).map_err(|e| self.db_err(e))?;
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&self.truncated_index.to_le_bytes());
        bytes[8..].copy_from_slice(&self.truncated_term.to_le_bytes());
        meta.insert(KEY_TRUNCATED, &bytes[..])
            .map_err(|e| self.db_err(e))?;
        Ok(())
    }

    fn begin(&self) -> Result<WriteTransaction, StoreError> {
        let mut txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| self.db_err(e))?;
        Ok(txn)
    }

    fn commit_txn(&self, txn: WriteTransaction) -> Result<(), StoreError> {
        txn.commit().map_err(|e| self.db_err(e))
    }

    fn read_entries(
        &self,
        low: u64,
        high: u64,
        max_size: Option<u64>,
    ) -> DbResult<Result<Vec<Entry>, String>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ENTRIES)?;
        let mut out = Vec::with_capacity((high - low).min(1024) as usize);
        let mut size = 0u64;
        for item in table.range(low..high)? {
            let (key, value) = item?;
            let entry = match Entry::parse_from_bytes(value.value()) {
                Ok(e) => e,
                Err(e) => return Ok(Err(format!("entry {}: {e}", key.value()))),
            };
            size += u64::from(entry.compute_size());
            if !out.is_empty() && max_size.is_some_and(|max| size > max) {
                break;
            }
            out.push(entry);
        }
        Ok(Ok(out))
    }

    fn read_term(&self, index: u64) -> DbResult<Option<Result<u64, String>>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ENTRIES)?;
        Ok(table.get(index)?.map(|v| {
            Entry::parse_from_bytes(v.value())
                .map(|e| e.term)
                .map_err(|e| format!("entry {index}: {e}"))
        }))
    }

    fn encode<M: protobuf::Message>(&self, what: &str, message: &M) -> Result<Vec<u8>, StoreError> {
        message
            .write_to_bytes()
            .map_err(|e| self.corrupt(what, &e.to_string()))
    }

    fn decode<M: protobuf::Message>(&self, what: &str, bytes: &[u8]) -> Result<M, StoreError> {
        M::parse_from_bytes(bytes).map_err(|e| self.corrupt(what, &e.to_string()))
    }

    fn db_err(&self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Db {
            path: self.path.clone(),
            source: e.into(),
        }
    }

    fn corrupt(&self, what: &str, message: &str) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            what: what.to_string(),
            message: message.to_string(),
        }
    }

    fn invalid(&self, message: String) -> StoreError {
        StoreError::Invalid {
            path: self.path.clone(),
            message,
        }
    }
}

/// Errors raft-rs cannot act on become `StorageError::Other` (raft-rs then fails the node).
fn other(e: impl std::fmt::Display) -> raft::Error {
    raft::Error::Store(RaftStorageError::Other(e.to_string().into()))
}

impl Storage for RedbStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.truncated_index {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        if high > self.last_index + 1 || low > high {
            return Err(raft::Error::Store(RaftStorageError::Unavailable));
        }
        if low == high {
            return Ok(Vec::new());
        }
        match self.read_entries(low, high, max_size.into()) {
            Ok(Ok(entries)) if entries.first().is_some_and(|e| e.index == low) => Ok(entries),
            Ok(Ok(_)) => Err(other(format!(
                "{}: entries {low}..{high} missing",
                self.path.display()
            ))),
            Ok(Err(message)) => Err(other(format!("{}: {message}", self.path.display()))),
            Err(e) => Err(other(format!("{}: {e}", self.path.display()))),
        }
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.truncated_index {
            return Ok(self.truncated_term);
        }
        if idx == self.snapshot_meta.index && idx != 0 {
            return Ok(self.snapshot_meta.term);
        }
        if idx < self.truncated_index {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        if idx > self.last_index {
            return Err(raft::Error::Store(RaftStorageError::Unavailable));
        }
        match self.read_term(idx) {
            Ok(Some(Ok(term))) => Ok(term),
            Ok(Some(Err(message))) => Err(other(format!("{}: {message}", self.path.display()))),
            Ok(None) => Err(other(format!(
                "{}: entry {idx} missing",
                self.path.display()
            ))),
            Err(e) => Err(other(format!("{}: {e}", self.path.display()))),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first_index_value())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index)
    }

    /// Serves the stored snapshot when it is recent enough and its configuration contains the
    /// recipient (raft-rs rejects a snapshot that does not name it, e.g. the bootstrap snapshot
    /// sent to a node added later). Otherwise asks the node for a fresh one
    /// ([`RedbStorage::take_snapshot_wanted`]) and answers "temporarily unavailable"; raft-rs
    /// retries on a later heartbeat.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let meta = &self.snapshot_meta;
        let cs = meta.get_conf_state();
        let names_recipient = cs
            .voters
            .iter()
            .chain(&cs.learners)
            .chain(&cs.voters_outgoing)
            .any(|id| *id == to);
        if meta.index == 0 || meta.index < request_index || !names_recipient {
            self.snapshot_wanted.set(true);
            return Err(raft::Error::Store(
                RaftStorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        match self.snapshot_data() {
            Ok(data) => {
                let mut snapshot = Snapshot::default();
                snapshot.set_metadata(meta.clone());
                snapshot.data = data.into();
                Ok(snapshot)
            }
            Err(e) => {
                tracing::error!(target: "strata::raft", error = %e, "reading the stored snapshot");
                Err(raft::Error::Store(
                    RaftStorageError::SnapshotTemporarilyUnavailable,
                ))
            }
        }
    }
}

fn decode_u32(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

fn decode_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Default::default()
        }
    }

    fn ctx() -> GetEntriesContext {
        GetEntriesContext::empty(false)
    }

    fn open(dir: &Path, id: u64) -> RedbStorage {
        RedbStorage::open(dir, id, StoreOptions::default())
            .unwrap()
            .0
    }

    #[test]
    fn fresh_store_is_empty_and_bumps_incarnation() {
        let dir = tempfile::tempdir().unwrap();
        let (store, info) = RedbStorage::open(dir.path(), 1, StoreOptions::default()).unwrap();
        assert!(info.created);
        assert_eq!(info.incarnation, 1);
        assert!(store.is_empty());
        assert_eq!(store.first_index().unwrap(), 1);
        assert_eq!(store.last_index().unwrap(), 0);
        assert_eq!(store.term(0).unwrap(), 0);
        drop(store);
        let (_, info) = RedbStorage::open(dir.path(), 1, StoreOptions::default()).unwrap();
        assert!(!info.created);
        assert_eq!(info.incarnation, 2);
    }

    #[test]
    fn append_overwrite_compact_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), 1);
        store.bootstrap(&[1, 2, 3], b"init".to_vec()).unwrap();
        assert_eq!(store.first_index().unwrap(), 2);
        assert_eq!(store.last_index().unwrap(), 1);
        assert_eq!(store.term(1).unwrap(), 1);
        store
            .append(&[entry(2, 1, b"a"), entry(3, 1, b"b"), entry(4, 1, b"c")])
            .unwrap();
        // A new leader overwrites index 3 onwards with a shorter suffix.
        store.append(&[entry(3, 2, b"x")]).unwrap();
        assert_eq!(store.last_index().unwrap(), 3);
        let got = store.entries(2, 4, None, ctx()).unwrap();
        assert_eq!(
            got.iter().map(|e| (e.index, e.term)).collect::<Vec<_>>(),
            vec![(2, 1), (3, 2)]
        );
        assert_eq!(&got[1].data[..], b"x");
        // Size limit: always at least one entry.
        assert_eq!(store.entries(2, 4, Some(0), ctx()).unwrap().len(), 1);
        let hs = HardState {
            term: 2,
            vote: 2,
            commit: 3,
            ..Default::default()
        };
        store.set_hardstate(hs.clone()).unwrap();

        // Compaction needs a snapshot covering the discarded entries.
        assert!(store.compact(3).is_err());
        store
            .create_snapshot(3, ConfState::from((vec![1, 2, 3], vec![])), b"img".to_vec())
            .unwrap();
        store.compact(3).unwrap();
        assert_eq!(store.first_index().unwrap(), 3);
        assert_eq!(store.term(2).unwrap(), 1);
        assert_eq!(
            store.entries(2, 4, None, ctx()),
            Err(raft::Error::Store(RaftStorageError::Compacted))
        );
        assert_eq!(
            store.term(1),
            Err(raft::Error::Store(RaftStorageError::Compacted))
        );

        drop(store);
        let store = open(dir.path(), 1);
        assert_eq!(store.hard_state(), &hs);
        assert_eq!(store.first_index().unwrap(), 3);
        assert_eq!(store.last_index().unwrap(), 3);
        assert_eq!(store.term(2).unwrap(), 1);
        assert_eq!(store.term(3).unwrap(), 2);
        assert_eq!(store.snapshot_metadata().index, 3);
        assert_eq!(store.snapshot_data().unwrap(), b"img");
        assert_eq!(store.conf_state().voters, vec![1, 2, 3]);
    }

    #[test]
    fn received_snapshot_replaces_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), 2);
        store
            .append(&[entry(1, 1, b"a"), entry(2, 1, b"b")])
            .unwrap();
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 10;
        snap.mut_metadata().term = 3;
        snap.mut_metadata().mut_conf_state().voters = vec![1, 2];
        snap.data = b"image".to_vec().into();
        store
            .persist_ready(Some(&snap), &[entry(11, 3, b"c")], None)
            .unwrap();
        assert_eq!(store.first_index().unwrap(), 11);
        assert_eq!(store.last_index().unwrap(), 11);
        assert_eq!(store.term(10).unwrap(), 3);
        assert_eq!(store.hard_state().commit, 10);
        assert_eq!(store.hard_state().term, 3);
        assert_eq!(store.conf_state().voters, vec![1, 2]);
        // Served to a member, refused (and a fresh one requested) for a non-member.
        assert_eq!(&store.snapshot(0, 1).unwrap().data[..], b"image");
        assert!(!store.take_snapshot_wanted());
        assert_eq!(
            store.snapshot(0, 5),
            Err(raft::Error::Store(
                RaftStorageError::SnapshotTemporarilyUnavailable
            ))
        );
        assert!(store.take_snapshot_wanted());
    }

    #[test]
    fn unknown_format_version_and_wrong_node_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(dir.path(), 1));
        match RedbStorage::open(dir.path(), 2, StoreOptions::default()) {
            Err(StoreError::WrongNode {
                stored: 1,
                requested: 2,
                ..
            }) => {}
            other => panic!("expected WrongNode, got {:?}", other.map(|_| ())),
        }
        {
            let db = Database::create(dir.path().join(DB_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert(KEY_VERSION, &99u32.to_le_bytes()[..])
                .unwrap();
            txn.commit().unwrap();
        }
        let err = RedbStorage::open(dir.path(), 1, StoreOptions::default())
            .map(|_| ())
            .unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::UnknownFormatVersion {
                    found: 99,
                    supported: FORMAT_VERSION,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("format version 99"), "{err}");
    }

    #[test]
    fn foreign_redb_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Database::create(dir.path().join(DB_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            let other: TableDefinition<u64, u64> = TableDefinition::new("other");
            txn.open_table(other).unwrap().insert(1, 2).unwrap();
            txn.commit().unwrap();
        }
        let err = RedbStorage::open(dir.path(), 1, StoreOptions::default())
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(err, StoreError::NotARaftLog { .. }), "{err}");
    }
}
