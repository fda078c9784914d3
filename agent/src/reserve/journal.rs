//! The book on disk: `reserve.json`, a snapshot replaced whole (write,
//! fsync, rename, fsync the directory), and `events.log`, an append-only
//! journal of the records since the snapshot, one JSON line each, synced
//! before a bind or release is acted on. Opening replays the log over the
//! snapshot; a torn last line (a crash mid-append, never acted on) is cut
//! off. Every line carries a sequence number, so lines the snapshot
//! already holds (a crash between snapshot and truncation) are skipped.

use std::{
    fs::{self, File, OpenOptions},
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use super::book::{Book, Record};
use crate::state::StateError;

const SNAPSHOT: &str = "reserve.json";
const LOG: &str = "events.log";
/// Lines after which the log is folded into the snapshot.
const COMPACT_AFTER: usize = 2048;

#[derive(Serialize, Deserialize)]
struct Line {
    seq: u64,
    #[serde(flatten)]
    record: Record,
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    seq: u64,
    book: Book,
}

/// See [`Journal::durability`].
#[derive(Debug)]
pub struct Durable {
    file: Arc<File>,
    path: PathBuf,
}

impl Durable {
    pub fn sync(self) -> Result<(), StateError> {
        self.file.sync_data().map_err(io(&self.path))
    }
}

#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    /// Shared with [`Durable`] handles: waiting for the disk needs no
    /// new descriptor per bind.
    log: Arc<File>,
    lines: usize,
    seq: u64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_owned(),
        source,
    }
}

fn corrupt(path: &Path) -> impl FnOnce(serde_json::Error) -> StateError + '_ {
    move |source| StateError::Corrupt {
        path: path.to_owned(),
        source,
    }
}

impl Journal {
    /// Opens (or creates) the journal in `dir` and rebuilds the book.
    pub fn open(dir: &Path) -> Result<(Self, Book), StateError> {
        let snap_path = dir.join(SNAPSHOT);
        let (mut seq, mut book) = match fs::read(&snap_path) {
            Ok(bytes) => {
                let s: Snapshot = serde_json::from_slice(&bytes).map_err(corrupt(&snap_path))?;
                (s.seq, s.book)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, Book::default()),
            Err(e) => return Err(io(&snap_path)(e)),
        };
        let log_path = dir.join(LOG);
        let mut lines = 0;
        let mut good_len: u64 = 0;
        let mut torn = false;
        match File::open(&log_path) {
            Ok(f) => {
                let mut reader = BufReader::new(f);
                let mut buf = String::new();
                loop {
                    buf.clear();
                    let n = reader.read_line(&mut buf).map_err(io(&log_path))?;
                    if n == 0 {
                        break;
                    }
                    if !buf.ends_with('\n') {
                        torn = true;
                        break;
                    }
                    let line: Line = match serde_json::from_str(buf.trim_end()) {
                        Ok(l) => l,
                        Err(e) => {
                            // Only the last line can be torn; anything
                            // after a bad line means the file is damaged.
                            let mut rest = String::new();
                            reader.read_line(&mut rest).map_err(io(&log_path))?;
                            if rest.is_empty() {
                                torn = true;
                                break;
                            }
                            return Err(corrupt(&log_path)(e));
                        }
                    };
                    good_len += n as u64;
                    lines += 1;
                    if line.seq > seq {
                        book.apply(&line.record);
                        seq = line.seq;
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&log_path)(e)),
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(&log_path))?;
        if torn {
            tracing::warn!(path = %log_path.display(), "cutting off a torn last journal line (a crash mid-write)");
            log.set_len(good_len).map_err(io(&log_path))?;
            log.sync_all().map_err(io(&log_path))?;
        }
        Ok((
            Self {
                dir: dir.to_owned(),
                log: Arc::new(log),
                lines,
                seq,
            },
            book,
        ))
    }

    /// Appends one record; `durable` waits for the disk.
    pub fn append(&mut self, record: &Record, durable: bool) -> Result<(), StateError> {
        let path = self.dir.join(LOG);
        let line = Line {
            seq: self.seq + 1,
            record: record.clone(),
        };
        let mut bytes = serde_json::to_vec(&line).map_err(corrupt(&path))?;
        bytes.push(b'\n');
        (&*self.log).write_all(&bytes).map_err(io(&path))?;
        if durable {
            self.log.sync_data().map_err(io(&path))?;
        }
        self.seq += 1;
        self.lines += 1;
        Ok(())
    }

    /// A handle to wait for the disk with after the caller let go of its
    /// lock: every append made before it is durable once [`Durable::sync`]
    /// returns, so concurrent appends share one flush.
    pub fn durability(&self) -> Durable {
        Durable {
            file: self.log.clone(),
            path: self.dir.join(LOG),
        }
    }

    /// Folds the log into the snapshot once it is long; `book` must be
    /// the book after every appended record.
    pub fn maybe_compact(&mut self, book: &Book) -> Result<(), StateError> {
        if self.lines < COMPACT_AFTER {
            return Ok(());
        }
        self.compact(book)
    }

    pub fn compact(&mut self, book: &Book) -> Result<(), StateError> {
        let path = self.dir.join(SNAPSHOT);
        let tmp = self.dir.join(format!(".{SNAPSHOT}.tmp"));
        let bytes = serde_json::to_vec(&Snapshot {
            seq: self.seq,
            book: book.clone(),
        })
        .map_err(corrupt(&path))?;
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(io(&path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        // Lines the snapshot holds are skipped on replay, so a crash
        // before this truncation loses nothing.
        let log = self.dir.join(LOG);
        self.log.set_len(0).map_err(io(&log))?;
        self.log.sync_all().map_err(io(&log))?;
        self.lines = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reserve::book::Pod;

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("weft-journal-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn fill(j: &mut Journal, book: &mut Book) {
        for r in [
            book.registered(
                3,
                "10.244.3.0/24".parse().unwrap(),
                "10.244.3.1".parse().unwrap(),
                60_000,
            )
            .unwrap(),
            Record::Contact { at_ms: 5 },
        ] {
            j.append(&r, true).unwrap();
            book.apply(&r);
        }
        let r = book
            .grant(&["10.244.3.2".parse().unwrap(), "10.244.3.3".parse().unwrap()])
            .unwrap();
        j.append(&r, true).unwrap();
        book.apply(&r);
        let key = ("c1".to_owned(), "eth0".to_owned());
        let (_, r) = book.bind(&key, &Pod::default(), 6, false).unwrap();
        let r = r.unwrap();
        j.append(&r, true).unwrap();
        book.apply(&r);
    }

    #[test]
    fn a_reopened_journal_rebuilds_the_same_book_with_or_without_a_snapshot() {
        let dir = tempdir("reopen");
        let (mut j, mut book) = Journal::open(&dir).unwrap();
        fill(&mut j, &mut book);
        drop(j);
        let (mut j, again) = Journal::open(&dir).unwrap();
        assert_eq!(again, book);
        j.compact(&book).unwrap();
        let r = Record::Ack { rseq: 1 };
        j.append(&r, false).unwrap();
        book.apply(&r);
        drop(j);
        let (_, again) = Journal::open(&dir).unwrap();
        assert_eq!(again, book);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_torn_last_line_is_cut_off_and_a_damaged_middle_is_an_error() {
        let dir = tempdir("torn");
        let (mut j, mut book) = Journal::open(&dir).unwrap();
        fill(&mut j, &mut book);
        drop(j);
        let log = dir.join(LOG);
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(b"{\"seq\":99,\"op\":\"gra").unwrap();
        drop(f);
        let (mut j, again) = Journal::open(&dir).unwrap();
        assert_eq!(again, book, "the torn line was never acted on");
        // Appending after the cut works and survives.
        let r = Record::Ack { rseq: 1 };
        j.append(&r, true).unwrap();
        book.apply(&r);
        drop(j);
        assert_eq!(Journal::open(&dir).unwrap().1, book);

        let text = fs::read_to_string(&log).unwrap();
        let damaged = text.replacen("\"op\"", "\"xx\"", 1);
        fs::write(&log, damaged).unwrap();
        let err = Journal::open(&dir).unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn lines_the_snapshot_holds_are_not_applied_twice() {
        let dir = tempdir("twice");
        let (mut j, mut book) = Journal::open(&dir).unwrap();
        fill(&mut j, &mut book);
        // A crash after the snapshot's rename, before the truncation.
        let kept = fs::read(dir.join(LOG)).unwrap();
        j.compact(&book).unwrap();
        drop(j);
        fs::write(dir.join(LOG), kept).unwrap();
        assert_eq!(Journal::open(&dir).unwrap().1, book);
        fs::remove_dir_all(&dir).unwrap();
    }
}
