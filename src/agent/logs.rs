//! Container logs in the CRI format (`<RFC 3339 nano time> <stdout|stderr> <F|P> <text>`), one
//! file per container attempt, rotated by size as the kubelet rotates them.
//!
//! The writer is `keel log-driver`, which containerd's shim starts for each container
//! (`binary://` stdio): it gets the container's stdout on fd 3 and stderr on fd 4, says it is
//! ready by closing fd 5, and lives as long as the container's output does, so that logging
//! goes on while the agent restarts. The reader serves `keelctl logs`: tail, since,
//! timestamps, a byte limit, and follow (across rotations, until the container stops).

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// A line longer than this is written in parts tagged `P`.
const MAX_LINE: usize = 16 << 10;

/// What the log driver is told: where to write and when to rotate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DriverConfig {
    pub path: PathBuf,
    pub max_size: u64,
    pub max_files: u32,
}

/// The rotated files of `path`, oldest first, then `path` itself.
pub fn files_of(path: &Path, max_files: u32) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = (1..max_files.max(1)).rev().map(|i| rotated(path, i)).filter(|p| p.exists()).collect();
    out.push(path.to_path_buf());
    out
}

fn rotated(path: &Path, i: u32) -> PathBuf {
    PathBuf::from(format!("{}.{i}", path.display()))
}

struct Writer {
    config: DriverConfig,
    file: File,
    size: u64,
}

impl Writer {
    fn open(config: DriverConfig) -> std::io::Result<Writer> {
        if let Some(d) = config.path.parent() {
            std::fs::create_dir_all(d)?;
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&config.path)?;
        let size = file.metadata()?.len();
        Ok(Writer { config, file, size })
    }

    fn line(&mut self, stream: &str, partial: bool, text: &[u8]) -> std::io::Result<()> {
        let stamp = humantime::format_rfc3339_nanos(SystemTime::now());
        let mut out = format!("{stamp} {stream} {} ", if partial { 'P' } else { 'F' }).into_bytes();
        out.extend_from_slice(text);
        out.push(b'\n');
        if self.size > 0 && self.size + out.len() as u64 > self.config.max_size {
            self.rotate()?;
        }
        self.file.write_all(&out)?;
        self.size += out.len() as u64;
        Ok(())
    }

    /// path → path.1 → path.2 …, the oldest dropped.
    fn rotate(&mut self) -> std::io::Result<()> {
        let keep = self.config.max_files.max(1);
        if keep == 1 {
            self.file.set_len(0)?;
            self.size = 0;
            return Ok(());
        }
        let _ = std::fs::remove_file(rotated(&self.config.path, keep - 1));
        for i in (1..keep - 1).rev() {
            let _ = std::fs::rename(rotated(&self.config.path, i), rotated(&self.config.path, i + 1));
        }
        std::fs::rename(&self.config.path, rotated(&self.config.path, 1))?;
        self.file = std::fs::OpenOptions::new().create(true).append(true).open(&self.config.path)?;
        self.size = 0;
        Ok(())
    }
}

/// Copies `input` into the log as `stream` lines until it ends.
fn pump(input: File, stream: &'static str, writer: Arc<Mutex<Writer>>) {
    let mut r = BufReader::with_capacity(MAX_LINE, input);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = match r.by_ref().take(MAX_LINE as u64).read_until(b'\n', &mut line) {
            Ok(n) => n,
            Err(_) => break,
        };
        if n == 0 {
            break;
        }
        let full = line.ends_with(b"\n");
        if full {
            line.pop();
        }
        // A line cut at MAX_LINE is partial; what is left at the end of the stream is whole.
        let partial = !full && line.len() >= MAX_LINE;
        let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = w.line(stream, partial, &line) {
            eprintln!("keel log-driver: {}: {e}", w.config.path.display());
        }
    }
}

/// `keel log-driver CONFIG`: runs as containerd's logging binary (fds 3, 4 and 5).
pub fn run_driver(config_json: &str) -> Result<(), String> {
    let config: DriverConfig = serde_json::from_str(config_json).map_err(|e| format!("log driver config: {e}"))?;
    let writer =
        Arc::new(Mutex::new(Writer::open(config.clone()).map_err(|e| format!("{}: {e}", config.path.display()))?));
    // SAFETY: the shim starts this binary with these descriptors open and owned by it.
    let (stdout, stderr, ready) = unsafe { (File::from_raw_fd(3), File::from_raw_fd(4), File::from_raw_fd(5)) };
    drop(ready);
    let w = writer.clone();
    let err_thread = std::thread::spawn(move || pump(stderr, "stderr", w));
    pump(stdout, "stdout", writer);
    let _ = err_thread.join();
    Ok(())
}

/// The `binary://` URI that makes the shim start `exe log-driver` for a container.
pub fn driver_uri(exe: &Path, config: &DriverConfig) -> String {
    let json = serde_json::to_string(config).unwrap_or_default();
    let query: String = url_escape(&json);
    format!("binary://{}?log-driver={query}", exe.display())
}

fn url_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One line of a log file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub time: Option<SystemTime>,
    pub partial: bool,
    pub text: Vec<u8>,
}

/// A CRI log line; a line in another format is all text, with no time.
pub fn parse(line: &[u8]) -> Line {
    let raw = Line { time: None, partial: false, text: line.to_vec() };
    let mut parts = line.splitn(4, |b| *b == b' ');
    let (Some(t), Some(stream), Some(tag)) = (parts.next(), parts.next(), parts.next()) else { return raw };
    if stream != b"stdout" && stream != b"stderr" || (tag != b"F" && tag != b"P") {
        return raw;
    }
    let Some(time) = std::str::from_utf8(t).ok().and_then(|t| humantime::parse_rfc3339(t).ok()) else { return raw };
    Line { time: Some(time), partial: tag == b"P", text: parts.next().unwrap_or_default().to_vec() }
}

/// What to read.
#[derive(Debug, Clone, Default)]
pub struct ReadOptions {
    pub tail_lines: Option<usize>,
    pub since: Option<SystemTime>,
    pub timestamps: bool,
    pub limit_bytes: Option<usize>,
}

fn render(l: &Line, timestamps: bool) -> Vec<u8> {
    let mut out = Vec::new();
    if timestamps {
        if let Some(t) = l.time {
            out.extend_from_slice(humantime::format_rfc3339_nanos(t).to_string().as_bytes());
            out.push(b' ');
        }
    }
    out.extend_from_slice(&l.text);
    if !l.partial {
        out.push(b'\n');
    }
    out
}

/// What the log of `path` (with its rotated files) holds now, as `opts` selects it; and how
/// far into the current file that went (to follow from there).
pub fn read(path: &Path, max_files: u32, opts: &ReadOptions) -> std::io::Result<(Vec<u8>, u64)> {
    let mut lines = Vec::new();
    let mut offset = 0;
    for f in files_of(path, max_files) {
        let data = match std::fs::read(&f) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if f == path {
            offset = data.len() as u64;
        }
        for raw in data.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let l = parse(raw);
            if opts.since.is_some_and(|s| l.time.is_some_and(|t| t < s)) {
                continue;
            }
            lines.push(l);
        }
    }
    if let Some(n) = opts.tail_lines {
        // Whole lines: a partial line belongs to the full line after it.
        let mut kept = 0;
        let mut start = lines.len();
        while start > 0 {
            if !lines[start - 1].partial {
                if kept == n {
                    break;
                }
                kept += 1;
            }
            start -= 1;
        }
        lines.drain(..start);
    }
    let mut out = Vec::new();
    for l in &lines {
        out.extend(render(l, opts.timestamps));
    }
    if let Some(limit) = opts.limit_bytes {
        out.truncate(limit);
    }
    Ok((out, offset))
}

/// Follows the log from `offset` of the current file: new lines as they come, across
/// rotations, until `done` says the container stopped and nothing is left.
pub async fn follow(
    path: PathBuf,
    mut offset: u64,
    timestamps: bool,
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    done: impl Fn() -> futures::future::BoxFuture<'static, bool> + Send,
) {
    use std::os::unix::fs::MetadataExt;
    let mut inode = std::fs::metadata(&path).map(|m| m.ino()).unwrap_or(0);
    let mut pending = Vec::new();
    for round in 0u64.. {
        // Asked before reading, so that what the container wrote before it stopped is read;
        // every half second, as asking the runtime costs more than reading a file.
        let stopped = round % 5 == 4 && done().await;
        let meta = std::fs::metadata(&path).ok();
        let rotated_away = meta.as_ref().is_some_and(|m| m.ino() != inode);
        if rotated_away {
            // Finish the file that was rotated (now path.1), then start the new one.
            if let Ok(mut f) = File::open(rotated(&path, 1)) {
                use std::io::Seek;
                if f.seek(std::io::SeekFrom::Start(offset)).is_ok() {
                    let _ = f.read_to_end(&mut pending);
                }
            }
            inode = meta.as_ref().map_or(0, |m| m.ino());
            offset = 0;
        }
        if let Ok(mut f) = File::open(&path) {
            use std::io::Seek;
            if f.seek(std::io::SeekFrom::Start(offset)).is_ok() {
                let before = pending.len();
                let _ = f.read_to_end(&mut pending);
                offset += (pending.len() - before) as u64;
            }
        }
        let mut out = Vec::new();
        while let Some(i) = pending.iter().position(|b| *b == b'\n') {
            let raw: Vec<u8> = pending.drain(..=i).collect();
            out.extend(render(&parse(&raw[..raw.len() - 1]), timestamps));
        }
        if !out.is_empty() && tx.send(out).await.is_err() {
            return;
        }
        if stopped {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Where pod `uid`'s container `name` logs its attempt `attempt`.
pub fn log_path(pods_dir: &Path, uid: &str, name: &str, attempt: u32) -> PathBuf {
    pods_dir.join(uid).join("logs").join(name).join(format!("{attempt}.log"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writer_writes_cri_lines_and_rotates_by_size() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("0.log");
        let config = DriverConfig { path: path.clone(), max_size: 200, max_files: 3 };
        let mut w = Writer::open(config).unwrap();
        for i in 0..20 {
            w.line(if i % 2 == 0 { "stdout" } else { "stderr" }, false, format!("line {i}").as_bytes()).unwrap();
        }
        let files = files_of(&path, 3);
        assert_eq!(files.len(), 3, "two rotated files and the current one: {files:?}");
        assert!(!rotated(&path, 3).exists(), "no more than max_files");
        for f in &files {
            assert!(std::fs::metadata(f).unwrap().len() <= 200);
        }
        let first = std::fs::read_to_string(&path).unwrap();
        let l = parse(first.lines().next().unwrap().as_bytes());
        assert!(l.time.is_some() && !l.partial);
        // The newest lines are all there, in order, across the files.
        let (all, _) = read(&path, 3, &ReadOptions::default()).unwrap();
        let text = String::from_utf8(all).unwrap();
        assert!(text.ends_with("line 18\nline 19\n"), "{text}");
        let (tail, _) = read(&path, 3, &ReadOptions { tail_lines: Some(2), ..Default::default() }).unwrap();
        assert_eq!(String::from_utf8(tail).unwrap(), "line 18\nline 19\n");
        let (limited, _) =
            read(&path, 3, &ReadOptions { tail_lines: Some(2), limit_bytes: Some(4), ..Default::default() }).unwrap();
        assert_eq!(limited, b"line");
    }

    #[test]
    fn partial_lines_join_and_foreign_lines_pass_through() {
        let l = parse(b"2026-01-02T03:04:05.000000006Z stdout P abc");
        assert!(l.partial && l.text == b"abc");
        assert_eq!(render(&l, false), b"abc");
        let raw = parse(b"just text");
        assert_eq!(raw.text, b"just text");
        assert!(raw.time.is_none());
        assert!(driver_uri(
            Path::new("/usr/bin/keel"),
            &DriverConfig { path: "/a b".into(), max_size: 1, max_files: 2 }
        )
        .starts_with("binary:///usr/bin/keel?log-driver=%7B%22path%22%3A%22%2Fa%20b%22"));
    }
}
