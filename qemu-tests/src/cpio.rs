//! A minimal writer of "newc" cpio archives, the format the Linux kernel unpacks as initramfs.
//!
//! Writing the archive ourselves (instead of `find | cpio`) lets it contain `/dev/console` without
//! root-owned `mknod` in a staging dir, and makes the image byte-for-byte reproducible from its
//! inputs (fixed mtimes, owners and inode numbers), so it can be cached by content.

use std::io::Write;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Builds a newc archive in memory.
#[derive(Debug, Default)]
pub struct CpioWriter {
    out: Vec<u8>,
    next_ino: u32,
}

impl CpioWriter {
    pub fn new() -> Self {
        CpioWriter {
            out: Vec::new(),
            next_ino: 1,
        }
    }

    /// A directory (parents must be added first, as the kernel creates entries in order).
    pub fn dir(&mut self, path: &str, perm: u32) {
        self.entry(path, S_IFDIR | (perm & 0o7777), 0, 0, &[]);
    }

    /// A regular file.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) {
        self.entry(path, S_IFREG | (perm & 0o7777), 0, 0, data);
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) {
        self.entry(path, S_IFLNK | 0o777, 0, 0, target.as_bytes());
    }

    /// A character device node.
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) {
        self.entry(path, S_IFCHR | (perm & 0o7777), major, minor, &[]);
    }

    /// Appends the trailer and returns the archive.
    pub fn finish(mut self) -> Vec<u8> {
        self.header("TRAILER!!!", 0, 0, 0, 0, 0, 1);
        self.out
    }

    fn entry(&mut self, path: &str, mode: u32, rmaj: u32, rmin: u32, data: &[u8]) {
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & S_IFDIR == S_IFDIR { 2 } else { 1 };
        // Archive sizes here are a few MiB; u32 is the format's own limit.
        let size = u32::try_from(data.len()).unwrap_or(u32::MAX);
        self.header(
            path.trim_start_matches('/'),
            ino,
            mode,
            size,
            rmaj,
            rmin,
            nlink,
        );
        self.out.extend_from_slice(data);
        self.pad4();
    }

    #[allow(clippy::too_many_arguments)]
    fn header(
        &mut self,
        name: &str,
        ino: u32,
        mode: u32,
        size: u32,
        rmaj: u32,
        rmin: u32,
        nlink: u32,
    ) {
        let namesize = name.len() as u32 + 1;
        // Fields: magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
        // rdevmajor, rdevminor, namesize, check.
        let _ = write!(
            self.out,
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{:08x}",
            0, 0, 0, 0, 0, 0
        );
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad4();
    }

    fn pad4(&mut self) {
        while self.out.len() & 3 != 0 {
            self.out.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn sample() -> Vec<u8> {
        let mut w = CpioWriter::new();
        w.dir("/bin", 0o755);
        w.file("/bin/hello", 0o755, b"#!/bin/sh\necho hi\n");
        w.symlink("/bin/sh", "busybox");
        w.dir("/dev", 0o755);
        w.char_dev("/dev/console", 0o600, 5, 1);
        w.finish()
    }

    #[test]
    fn layout_is_aligned_and_terminated() {
        let a = sample();
        assert_eq!(a.len() % 4, 0);
        assert!(a.starts_with(b"070701"));
        let trailer = b"TRAILER!!!\0";
        assert!(a.windows(trailer.len()).any(|w| w == trailer));
        // Reproducible: same inputs, same bytes (the cache key relies on it).
        assert_eq!(a, sample());
    }

    /// Cross-checks the format against GNU cpio when it is installed (it is, via install-deps).
    #[test]
    fn gnu_cpio_lists_the_entries() {
        if !crate::util::on_path("cpio") {
            eprintln!("cpio not installed; skipping the cross-check");
            return;
        }
        let mut child = Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&sample()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(listing.contains("bin/hello"), "{listing}");
        assert!(listing.contains("bin/sh -> busybox"), "{listing}");
        assert!(listing
            .lines()
            .any(|l| l.starts_with('c') && l.contains("dev/console")));
        assert!(listing
            .lines()
            .any(|l| l.starts_with("-rwxr-xr-x") && l.contains("18")));
    }
}
