//! A file streamed from disk in bounded chunks, for static routes.
//!
//! The file is never read whole: each frame is one read of at most [`CHUNK`] bytes,
//! taken only when hyper asks for the next frame, so a slow client holds back the disk
//! reads and a 10 GiB media file costs one chunk of memory at a time.

use std::io::{self, Seek, SeekFrom};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::Frame;
use tokio::io::{AsyncRead, ReadBuf};

use super::BodyError;

/// The largest read, and so the largest frame: big enough to keep syscalls and thread
/// hops rare, small enough that thousands of downloads fit in memory.
pub const CHUNK: usize = 64 * 1024;

/// `len` bytes of an open file, from `start` on.
pub struct FileStream {
    file: tokio::fs::File,
    remaining: u64,
    buf: BytesMut,
}

impl FileStream {
    /// Positions `file` at `start`; the stream then yields exactly `len` bytes or fails.
    pub fn new(mut file: std::fs::File, start: u64, len: u64) -> io::Result<FileStream> {
        // lseek only moves the file offset: no disk access, safe on the async thread.
        file.seek(SeekFrom::Start(start))?;
        Ok(FileStream {
            file: tokio::fs::File::from_std(file),
            remaining: len,
            buf: BytesMut::new(),
        })
    }

    /// Bytes still to be sent.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    pub(super) fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let want = self.remaining.min(CHUNK as u64) as usize;
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        let mut read = ReadBuf::new(&mut self.buf[..want]);
        let polled = ready!(Pin::new(&mut self.file).poll_read(cx, &mut read));
        let filled = read.filled().len();
        if let Err(e) = polled {
            return self.fail(e);
        }
        if filled == 0 {
            // The file shrank after its length was announced: sending less than the
            // Content-Length would look like a complete (wrong) file, so abort instead.
            let shrunk = io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the file ended {} bytes early", self.remaining),
            );
            return self.fail(shrunk);
        }
        self.remaining -= filled as u64;
        Poll::Ready(Some(Ok(Frame::data(self.buf.split_to(filled).freeze()))))
    }

    fn fail(&mut self, error: io::Error) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.remaining = 0;
        Poll::Ready(Some(Err(BodyError::File(error))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp_file(len: usize) -> (std::path::PathBuf, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let path = std::env::temp_dir().join(format!("qp-filestream-{}-{len}", std::process::id()));
        let mut f = std::fs::File::create(&path).expect("temp file");
        f.write_all(&data).expect("write temp file");
        (path, data)
    }

    async fn frames(mut stream: FileStream) -> Vec<Result<Bytes, BodyError>> {
        let mut out = Vec::new();
        while let Some(frame) = std::future::poll_fn(|cx| stream.poll_data(cx)).await {
            out.push(frame.map(|f| f.into_data().unwrap_or_default()));
        }
        out
    }

    #[tokio::test]
    async fn reads_a_range_in_chunks_no_larger_than_the_bound() {
        let (path, data) = temp_file(3 * CHUNK + 123);
        let file = std::fs::File::open(&path).expect("open");
        let start = 1000u64;
        let len = (2 * CHUNK + 77) as u64;
        let chunks = frames(FileStream::new(file, start, len).expect("seek")).await;
        let _ = std::fs::remove_file(&path);
        let mut got = Vec::new();
        for chunk in chunks {
            let chunk = chunk.expect("no error");
            assert!(chunk.len() <= CHUNK, "a frame of {} bytes", chunk.len());
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got, &data[start as usize..(start + len) as usize]);
    }

    #[tokio::test]
    async fn a_file_shorter_than_announced_ends_in_an_error_not_a_short_body() {
        let (path, _) = temp_file(100);
        let file = std::fs::File::open(&path).expect("open");
        let chunks = frames(FileStream::new(file, 0, 200).expect("seek")).await;
        let _ = std::fs::remove_file(&path);
        assert_eq!(chunks.len(), 2);
        assert!(chunks[0].is_ok());
        assert!(matches!(chunks[1], Err(BodyError::File(_))));
    }
}
