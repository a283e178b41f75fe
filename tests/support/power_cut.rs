//! A disk that can lose its power: a FUSE file system whose files keep, when the power is cut,
//! what `fsync` or `fdatasync` made durable, and of the rest only what the cut leaves.
//!
//! The tree the processes using the mount see lives under a work directory's `live/` (every
//! write, creation, rename and removal lands there at once). What a power cut leaves is kept
//! apart, by inode: a file's durable contents in `durable/<inode>`, a directory's durable
//! entries (name, inode, kind) in memory. Each write and truncation is recorded; `fsync` and
//! `fdatasync` of a file apply those recorded since the last one to its durable contents, in
//! order, and `fsync` of a directory makes its present entries its durable ones. Nothing else
//! makes anything durable: not `close`, not `sync_file_range` (which never reaches a FUSE file
//! system; on a real disk it writes data pages but neither the file's size nor the disk's
//! cache), not time. So a file created, written and synced, in a directory never synced after,
//! is gone after the cut, and a rename not followed by a sync of its directories is undone.
//!
//! [`PowerCutDisk::cut_power`] unmounts and leaves at the mount point a plain directory tree
//! built from the durable entries and contents, on which a process can be started again. What
//! becomes of the writes not synced is the caller's choice ([`Unsynced`]): all lost, or some
//! kept, some lost and some torn at a sector boundary, as a disk that wrote part of its cache
//! back, in any order, before the power went. Names not synced are lost either way. Mounting
//! needs root (the `mount` system call) and `/dev/fuse`.

use fuser::{
    BackgroundSession, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use rand::SeedableRng;
use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A mounted power-cut disk; dropped without [`PowerCutDisk::cut_power`], it unmounts.
#[derive(Debug)]
pub struct PowerCutDisk {
    mount_point: PathBuf,
    live: PathBuf,
    durable: PathBuf,
    /// Shared with the file system, for the writes not synced when the power fails.
    state: Arc<Mutex<State>>,
    session: Option<BackgroundSession>,
    /// Holds `live/` and `durable/`; removed after the unmount.
    _work: tempfile::TempDir,
}

impl PowerCutDisk {
    /// Mounts an empty disk at `mount_point` (created if missing; it must be empty).
    pub fn mount(mount_point: &Path) -> PowerCutDisk {
        std::fs::create_dir_all(mount_point).expect("the mount point");
        // Beside the mount point, in the directory that holds it and is removed with it.
        let work = tempfile::tempdir_in(mount_point.parent().expect("a parent directory"))
            .expect("the disk's work directory");
        let live = work.path().join("live");
        let durable = work.path().join("durable");
        std::fs::create_dir(&live).expect("live/");
        std::fs::create_dir(&durable).expect("durable/");
        let state = Arc::new(Mutex::new(State::new()));
        let file_system = SyncTrackingFs {
            live: live.clone(),
            durable: durable.clone(),
            state: state.clone(),
        };
        let mut config = fuser::Config::default();
        config
            .mount_options
            .push(fuser::MountOption::FSName("lienthong-power-cut".into()));
        let session = fuser::spawn_mount(file_system, mount_point, &config).unwrap_or_else(|e| {
            panic!("mounting the power-cut disk at {mount_point:?} (needs root and /dev/fuse): {e}")
        });
        PowerCutDisk {
            mount_point: mount_point.to_owned(),
            live,
            durable,
            state,
            session: Some(session),
            _work: work,
        }
    }

    /// The power fails: what was synced stays, the rest goes as `unsynced` says. Unmounts
    /// (every process using the disk must be dead: a power cut kills them too) and leaves at
    /// the mount point the files as the disk kept them.
    pub fn cut_power(mut self, unsynced: Unsynced) -> PowerCut {
        if let Some(session) = self.session.take() {
            session
                .umount_and_join()
                .expect("unmount the power-cut disk");
        }
        let mut cut = PowerCut::default();
        let mut rng = match unsynced {
            Unsynced::Lost => None,
            Unsynced::PartlyKept { seed } => Some(rand::rngs::StdRng::seed_from_u64(seed)),
        };
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        // In inode order, so that a seed draws the same fates again.
        let mut inodes: Vec<&u64> = state.nodes.keys().collect();
        inodes.sort();
        for inode in inodes {
            let node = &state.nodes[inode];
            if node.unsynced.is_empty() {
                continue;
            }
            let Some(rng) = rng.as_mut() else {
                cut.lost += node.unsynced.len();
                continue;
            };
            let durable =
                open_durable_contents(&self.durable, *inode).expect("open a durable file");
            for change in &node.unsynced {
                cut.apply_some(&durable, change, rng);
            }
        }
        cut.names_lost = state.names_not_durable(&self.live, Path::new(""));
        state.build_durable_tree(ROOT, &self.mount_point, &self.durable);
        cut
    }
}

/// What a power cut does to the writes that were not synced.
#[derive(Debug, Clone, Copy)]
pub enum Unsynced {
    /// All lost.
    Lost,
    /// Each kept or lost, a kept one torn at a sector boundary now and then, drawn from `seed`.
    PartlyKept { seed: u64 },
}

/// The writes not synced when the power failed, by fate ([`Unsynced::PartlyKept`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct PowerCut {
    pub kept: usize,
    pub torn: usize,
    pub lost: usize,
    /// Creations, renames and removals made in a directory after its last sync: undone.
    pub names_lost: usize,
}

impl PowerCut {
    /// Half the changes are lost; a quarter of the writes kept are torn.
    fn apply_some(&mut self, durable: &File, change: &Change, rng: &mut rand::rngs::StdRng) {
        use rand::Rng;
        if rng.random_bool(0.5) {
            self.lost += 1;
            return;
        }
        match change {
            Change::Write { offset, data } => {
                let kept = if data.len() > SECTOR && rng.random_bool(0.25) {
                    self.torn += 1;
                    rng.random_range(0..data.len() / SECTOR) * SECTOR
                } else {
                    self.kept += 1;
                    data.len()
                };
                durable
                    .write_all_at(&data[..kept], *offset)
                    .expect("write to a durable file");
            }
            Change::SetLength(length) => {
                self.kept += 1;
                durable.set_len(*length).expect("size a durable file");
            }
        }
    }
}

/// The unit a disk writes whole: 512 bytes, the smallest sector disks have, so that tears
/// fall in as many places as they can.
pub const SECTOR: usize = 512;

impl Drop for PowerCutDisk {
    fn drop(&mut self) {
        if let Some(session) = self.session.take()
            && session.umount_and_join().is_err()
        {
            // A process still holds files on it (after a panic): detached now, served until
            // they are closed.
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.mount_point)
                .status();
        }
    }
}

/// The FUSE side of [`PowerCutDisk`].
#[derive(Debug)]
struct SyncTrackingFs {
    live: PathBuf,
    durable: PathBuf,
    state: Arc<Mutex<State>>,
}

/// Inodes are numbered by the file system, paths relative to `live/`.
#[derive(Debug)]
struct State {
    nodes: HashMap<u64, Node>,
    by_path: HashMap<PathBuf, u64>,
    next_inode: u64,
    open_files: HashMap<u64, File>,
    next_handle: u64,
    /// Each directory's entries as of its last sync; one never synced has none.
    durable_entries: HashMap<u64, BTreeMap<OsString, DurableEntry>>,
}

#[derive(Debug)]
struct Node {
    path: PathBuf,
    /// The changes to the contents since the last sync, in the order made.
    unsynced: Vec<Change>,
    /// Removed (or replaced by a rename) while perhaps still open: it has no name any more.
    removed: bool,
    /// The permission bits last set, given back to the durable copy.
    mode: u32,
}

/// A name in a directory, as a sync of the directory made it durable.
#[derive(Debug, Clone, Copy, PartialEq)]
struct DurableEntry {
    inode: u64,
    directory: bool,
}

/// A change to a file's contents.
#[derive(Debug)]
enum Change {
    Write { offset: u64, data: Vec<u8> },
    SetLength(u64),
}

const ROOT: u64 = 1;
/// Attributes and names are never cached by the kernel: sizes change under it all the time.
const NO_CACHE: Duration = Duration::ZERO;

impl State {
    fn new() -> State {
        let root = Node {
            path: PathBuf::new(),
            unsynced: Vec::new(),
            removed: false,
            mode: 0o755,
        };
        State {
            nodes: HashMap::from([(ROOT, root)]),
            by_path: HashMap::from([(PathBuf::new(), ROOT)]),
            next_inode: ROOT + 1,
            open_files: HashMap::new(),
            next_handle: 1,
            durable_entries: HashMap::new(),
        }
    }

    fn path(&self, inode: INodeNo) -> Result<PathBuf, Errno> {
        self.nodes
            .get(&inode.0)
            .filter(|node| !node.removed)
            .map(|node| node.path.clone())
            .ok_or(Errno::ENOENT)
    }

    fn inode_of(&mut self, path: &Path) -> u64 {
        if let Some(inode) = self.by_path.get(path) {
            return *inode;
        }
        let inode = self.next_inode;
        self.next_inode += 1;
        self.nodes.insert(
            inode,
            Node {
                path: path.to_owned(),
                unsynced: Vec::new(),
                removed: false,
                mode: 0o644,
            },
        );
        self.by_path.insert(path.to_owned(), inode);
        inode
    }

    fn forget_path(&mut self, path: &Path) {
        if let Some(inode) = self.by_path.remove(path)
            && let Some(node) = self.nodes.get_mut(&inode)
        {
            node.removed = true;
        }
    }

    fn record(&mut self, inode: INodeNo, change: Change) {
        if let Some(node) = self.nodes.get_mut(&inode.0) {
            node.unsynced.push(change);
        }
    }

    /// Writes under `to` the tree whose durable entries start at the directory `inode`: its
    /// subdirectories, and its files with their durable contents (empty if never synced).
    fn build_durable_tree(&self, inode: u64, to: &Path, contents: &Path) {
        let Some(entries) = self.durable_entries.get(&inode) else {
            return;
        };
        for (name, entry) in entries {
            let path = to.join(name);
            let mode = self.nodes.get(&entry.inode).map_or(0o644, |node| node.mode);
            if entry.directory {
                std::fs::create_dir(&path).expect("a durable directory");
                self.build_durable_tree(entry.inode, &path, contents);
            } else {
                // Copied, not moved: a file renamed from one synced directory to another can
                // be durable under both names.
                match std::fs::copy(durable_contents(contents, entry.inode), &path) {
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                        File::create(&path)
                            .map(drop)
                            .expect("an empty durable file")
                    }
                    copied => drop(copied.expect("copy a durable file")),
                }
            }
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                .expect("the durable permissions");
        }
    }

    /// How many names in the live tree under the directory `path` differ from the durable
    /// entries of their directory: created, renamed or removed since its last sync.
    fn names_not_durable(&self, live: &Path, path: &Path) -> usize {
        let Some(inode) = self.by_path.get(path) else {
            return 0;
        };
        let durable = self.durable_entries.get(inode);
        let mut differing = 0;
        let mut seen = 0;
        for entry in std::fs::read_dir(live.join(path)).expect("a live directory") {
            let entry = entry.expect("a live entry");
            let child = path.join(entry.file_name());
            let kept = durable.and_then(|entries| entries.get(&entry.file_name()));
            match (kept, self.by_path.get(&child)) {
                (Some(kept), Some(inode)) if kept.inode == *inode => seen += 1,
                (Some(_), _) => {
                    seen += 1;
                    differing += 1
                }
                (None, _) => differing += 1,
            }
            if entry.file_type().expect("a live entry's kind").is_dir() {
                differing += self.names_not_durable(live, &child);
            }
        }
        // Durable names removed since.
        differing + durable.map_or(0, |entries| entries.len()) - seen
    }

    fn set_mode(&mut self, inode: INodeNo, mode: u32) {
        if let Some(node) = self.nodes.get_mut(&inode.0) {
            node.mode = mode & 0o7777;
        }
    }

    fn open_file(&mut self, file: File) -> FileHandle {
        let handle = self.next_handle;
        self.next_handle += 1;
        self.open_files.insert(handle, file);
        FileHandle(handle)
    }
}

impl SyncTrackingFs {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What an entry's name and attributes are replied with.
    fn entry(&self, state: &mut State, path: &Path) -> Result<FileAttr, Errno> {
        let metadata = std::fs::symlink_metadata(self.live.join(path))?;
        Ok(attributes(state.inode_of(path), &metadata))
    }

    /// `fsync`: the changes since the last one become durable, in order.
    fn sync(&self, state: &mut State, inode: INodeNo) -> Result<(), Errno> {
        let Some(node) = state.nodes.get_mut(&inode.0) else {
            return Err(Errno::ENOENT);
        };
        let changes = std::mem::take(&mut node.unsynced);
        if changes.is_empty() {
            return Ok(());
        }
        let durable = open_durable_contents(&self.durable, inode.0)?;
        for change in changes {
            match change {
                Change::Write { offset, data } => durable.write_all_at(&data, offset)?,
                Change::SetLength(length) => durable.set_len(length)?,
            }
        }
        Ok(())
    }
}

/// Where the durable contents of the file `inode` are kept, under `durable/`.
fn durable_contents(durable: &Path, inode: u64) -> PathBuf {
    durable.join(inode.to_string())
}

/// The durable contents of the file `inode`, opened for writing (created empty if missing).
fn open_durable_contents(durable: &Path, inode: u64) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(durable_contents(durable, inode))
}

fn attributes(inode: u64, metadata: &std::fs::Metadata) -> FileAttr {
    let time = |seconds: i64, nanos: i64| {
        UNIX_EPOCH + Duration::new(seconds.max(0) as u64, nanos.clamp(0, 999_999_999) as u32)
    };
    FileAttr {
        ino: INodeNo(inode),
        size: metadata.size(),
        blocks: metadata.blocks(),
        atime: time(metadata.atime(), metadata.atime_nsec()),
        mtime: time(metadata.mtime(), metadata.mtime_nsec()),
        ctime: time(metadata.ctime(), metadata.ctime_nsec()),
        crtime: UNIX_EPOCH,
        kind: FileType::from_std(metadata.file_type()).unwrap_or(FileType::RegularFile),
        perm: (metadata.mode() & 0o7777) as u16,
        nlink: metadata.nlink() as u32,
        uid: metadata.uid(),
        gid: metadata.gid(),
        rdev: metadata.rdev() as u32,
        blksize: metadata.blksize() as u32,
        flags: 0,
    }
}

impl fuser::Filesystem for SyncTrackingFs {
    fn lookup(&self, _: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.at_name(parent, name, |state, path| self.entry(state, &path)) {
            Ok(attr) => reply.entry(&NO_CACHE, &attr, Generation(0)),
            Err(errno) => reply.error(errno),
        }
    }

    fn getattr(&self, _: &Request, inode: INodeNo, _: Option<FileHandle>, reply: ReplyAttr) {
        let mut state = self.state();
        match state
            .path(inode)
            .and_then(|path| self.entry(&mut state, &path))
        {
            Ok(attr) => reply.attr(&NO_CACHE, &attr),
            Err(errno) => reply.error(errno),
        }
    }

    fn setattr(
        &self,
        _: &Request,
        inode: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut state = self.state();
        let changed = state.path(inode).and_then(|path| {
            let live = self.live.join(&path);
            if let Some(size) = size {
                OpenOptions::new().write(true).open(&live)?.set_len(size)?;
                state.record(inode, Change::SetLength(size));
            }
            if let Some(mode) = mode {
                std::fs::set_permissions(&live, std::fs::Permissions::from_mode(mode))?;
                state.set_mode(inode, mode);
            }
            self.entry(&mut state, &path)
        });
        match changed {
            Ok(attr) => reply.attr(&NO_CACHE, &attr),
            Err(errno) => reply.error(errno),
        }
    }

    fn mkdir(
        &self,
        _: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let made = self.at_name(parent, name, |state, path| {
            let live = self.live.join(&path);
            std::fs::create_dir(&live)?;
            std::fs::set_permissions(&live, std::fs::Permissions::from_mode(mode & !umask))?;
            let attr = self.entry(state, &path)?;
            state.set_mode(attr.ino, mode & !umask);
            Ok(attr)
        });
        match made {
            Ok(attr) => reply.entry(&NO_CACHE, &attr, Generation(0)),
            Err(errno) => reply.error(errno),
        }
    }

    fn unlink(&self, _: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, false, reply);
    }

    fn rmdir(&self, _: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, true, reply);
    }

    fn rename(
        &self,
        _: &Request,
        parent: INodeNo,
        name: &OsStr,
        new_parent: INodeNo,
        new_name: &OsStr,
        _: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut state = self.state();
        let renamed = (|| {
            let from = state.path(parent)?.join(name);
            let to = state.path(new_parent)?.join(new_name);
            std::fs::rename(self.live.join(&from), self.live.join(&to))?;
            state.forget_path(&to);
            // The renamed node and, for a directory, everything under it.
            let moved: Vec<(PathBuf, u64)> = state
                .by_path
                .iter()
                .filter(|(path, _)| path.starts_with(&from))
                .map(|(path, inode)| (path.clone(), *inode))
                .collect();
            for (old_path, inode) in moved {
                // `join` of an empty path would add a trailing slash.
                let new_path = match old_path.strip_prefix(&from).expect("under `from`") {
                    below if below.as_os_str().is_empty() => to.clone(),
                    below => to.join(below),
                };
                state.by_path.remove(&old_path);
                state.by_path.insert(new_path.clone(), inode);
                if let Some(node) = state.nodes.get_mut(&inode) {
                    node.path = new_path;
                }
            }
            Ok::<(), Errno>(())
        })();
        match renamed {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn open(&self, _: &Request, inode: INodeNo, _: OpenFlags, reply: ReplyOpen) {
        let mut state = self.state();
        let opened = state.path(inode).and_then(|path| {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(self.live.join(path))?;
            Ok(state.open_file(file))
        });
        match opened {
            Ok(handle) => reply.opened(handle, FopenFlags::empty()),
            Err(errno) => reply.error(errno),
        }
    }

    fn create(
        &self,
        _: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let created = self.at_name(parent, name, |state, path| {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(mode & !umask)
                .open(self.live.join(&path))?;
            // Neither the name nor the contents are durable yet.
            let attr = self.entry(state, &path)?;
            state.set_mode(attr.ino, mode & !umask);
            Ok((attr, state.open_file(file)))
        });
        match created {
            Ok((attr, handle)) => {
                reply.created(&NO_CACHE, &attr, Generation(0), handle, FopenFlags::empty())
            }
            Err(errno) => reply.error(errno),
        }
    }

    fn read(
        &self,
        _: &Request,
        _: INodeNo,
        handle: FileHandle,
        offset: u64,
        size: u32,
        _: OpenFlags,
        _: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let state = self.state();
        let Some(file) = state.open_files.get(&handle.0) else {
            return reply.error(Errno::EBADF);
        };
        let mut buffer = vec![0u8; size as usize];
        let mut filled = 0;
        while filled < buffer.len() {
            match file.read_at(&mut buffer[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(read) => filled += read,
                Err(error) => return reply.error(error.into()),
            }
        }
        reply.data(&buffer[..filled]);
    }

    fn write(
        &self,
        _: &Request,
        inode: INodeNo,
        handle: FileHandle,
        offset: u64,
        data: &[u8],
        _: WriteFlags,
        _: OpenFlags,
        _: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut state = self.state();
        let Some(file) = state.open_files.get(&handle.0) else {
            return reply.error(Errno::EBADF);
        };
        match file.write_all_at(data, offset) {
            Ok(()) => {
                state.record(
                    inode,
                    Change::Write {
                        offset,
                        data: data.to_vec(),
                    },
                );
                reply.written(data.len() as u32);
            }
            Err(error) => reply.error(error.into()),
        }
    }

    fn flush(&self, _: &Request, _: INodeNo, _: FileHandle, _: fuser::LockOwner, r: ReplyEmpty) {
        // `close` makes nothing durable.
        r.ok();
    }

    fn release(
        &self,
        _: &Request,
        _: INodeNo,
        handle: FileHandle,
        _: OpenFlags,
        _: Option<fuser::LockOwner>,
        _: bool,
        reply: ReplyEmpty,
    ) {
        self.state().open_files.remove(&handle.0);
        reply.ok();
    }

    fn fsync(&self, _: &Request, inode: INodeNo, _: FileHandle, _: bool, reply: ReplyEmpty) {
        let mut state = self.state();
        match self.sync(&mut state, inode) {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn readdir(
        &self,
        _: &Request,
        inode: INodeNo,
        _: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut state = self.state();
        let listed = state.path(inode).and_then(|path| {
            let mut entries = vec![
                (inode.0, FileType::Directory, ".".into()),
                (inode.0, FileType::Directory, "..".into()),
            ];
            for entry in std::fs::read_dir(self.live.join(&path))? {
                let entry = entry?;
                let kind = FileType::from_std(entry.file_type()?).unwrap_or(FileType::RegularFile);
                let child = state.inode_of(&path.join(entry.file_name()));
                entries.push((child, kind, entry.file_name()));
            }
            Ok(entries)
        });
        match listed {
            Ok(entries) => {
                for (index, (child, kind, name)) in entries.into_iter().enumerate() {
                    if (index as u64) < offset {
                        continue;
                    }
                    if reply.add(INodeNo(child), index as u64 + 1, kind, &name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(errno) => reply.error(errno),
        }
    }

    fn fsyncdir(&self, _: &Request, inode: INodeNo, _: FileHandle, _: bool, reply: ReplyEmpty) {
        let mut state = self.state();
        let synced = state.path(inode).and_then(|path| {
            let mut entries = BTreeMap::new();
            for entry in std::fs::read_dir(self.live.join(&path))? {
                let entry = entry?;
                let durable = DurableEntry {
                    inode: state.inode_of(&path.join(entry.file_name())),
                    directory: entry.file_type()?.is_dir(),
                };
                entries.insert(entry.file_name(), durable);
            }
            state.durable_entries.insert(inode.0, entries);
            Ok(())
        });
        match synced {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn statfs(&self, _: &Request, _: INodeNo, reply: ReplyStatfs) {
        match rustix::fs::statvfs(&self.live) {
            Ok(fs) => reply.statfs(
                fs.f_blocks,
                fs.f_bfree,
                fs.f_bavail,
                fs.f_files,
                fs.f_ffree,
                fs.f_bsize as u32,
                fs.f_namemax as u32,
                fs.f_frsize as u32,
            ),
            Err(errno) => reply.error(Errno::from_i32(errno.raw_os_error())),
        }
    }

    fn access(&self, _: &Request, _: INodeNo, _: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }
}

impl SyncTrackingFs {
    /// Runs `operation` with the state locked, on the path of `name` in the directory `parent`.
    fn at_name<T>(
        &self,
        parent: INodeNo,
        name: &OsStr,
        operation: impl FnOnce(&mut State, PathBuf) -> Result<T, Errno>,
    ) -> Result<T, Errno> {
        let mut state = self.state();
        let path = state.path(parent)?.join(name);
        operation(&mut state, path)
    }

    fn remove(&self, parent: INodeNo, name: &OsStr, directory: bool, reply: ReplyEmpty) {
        let removed = self.at_name(parent, name, |state, path| {
            if directory {
                std::fs::remove_dir(self.live.join(&path))?;
            } else {
                std::fs::remove_file(self.live.join(&path))?;
            }
            state.forget_path(&path);
            Ok(())
        });
        match removed {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }
}
