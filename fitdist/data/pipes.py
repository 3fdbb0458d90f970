"""Opening a shard for reading: local files directly, everything else (`pipe:` commands, http(s)
through curl, other webdataset `gopen` schemes) as a subprocess read with a stall timeout.

A source that stops sending (a hung `pipe:` command, an http server that never answers the next
read) would otherwise block its loader worker forever, and with it the training step of its rank,
and then every other rank until the NCCL timeout (30 minutes) ends the job without saying why.
`TimedPipe` waits at most `timeout` seconds for each chunk of data (`select` on the subprocess's
stdout), then kills the subprocess and raises `Stalled`, which names the shard; the reader turns it
into a run-ending error. Local files are read as they are: a regular file never stalls a `select`.

`pipe:` commands and http(s) URLs (curl, with webdataset's arguments) are started here, each in a
session of its own, so that a kill reaches the whole command (`sh -c "aws s3 cp ... -"` and its
children), not only the shell. Other schemes go through webdataset's `gopen`.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess

from fitdist.data.manifest import is_local, local_path

CHUNK = 1 << 16  # a pipe holds 64 KiB: one read takes what is there
CLOSE_WAIT_S = 1.0  # after closing early, how long a well-behaved command gets to exit (SIGPIPE)


class Stalled(Exception):
    """No data from a shard's source for the configured time."""


# webdataset's gopen_curl: the same retries; exit 23 (write error) is curl seeing the reader close
CURL = ["curl", "--connect-timeout", "30", "--retry", "30", "--retry-delay", "2", "-f", "-s", "-L"]
OK_STATUS = {"pipe": (0, 141), "curl": (0, 141, 23)}  # 141: SIGPIPE after an early close


class TimedPipe:
    """A subprocess's stdout read straight from its file descriptor (never through a buffered
    reader, whose buffer `select` cannot see). `read(n)` returns `n` bytes, or fewer at the end."""

    def __init__(self, proc: subprocess.Popen, url: str, timeout: float, ok=(0,), group=False):
        self.proc, self.url, self.timeout, self.ok, self.group = proc, url, timeout, ok, group
        self.fd = proc.stdout.fileno()
        self.buf, self.pos, self.eof = b"", 0, False
        self.owner = None

    def _fill(self) -> bool:
        if self.timeout > 0:
            ready, _, _ = select.select([self.fd], [], [], self.timeout)
            if not ready:
                self._kill()
                raise Stalled(
                    f"no data from {self.url} for {self.timeout:g} s (a stalled pipe: command "
                    f"or http(s) read); raise data.read_timeout if the source is just slow"
                )
        self.buf, self.pos = os.read(self.fd, CHUNK), 0
        if not self.buf:
            self.eof = True
            self._check_exit()
        return not self.eof

    def read(self, n: int = -1) -> bytes:
        parts = []
        while n != 0 and (self.pos < len(self.buf) or (not self.eof and self._fill())):
            take = len(self.buf) - self.pos if n < 0 else min(n, len(self.buf) - self.pos)
            parts.append(self.buf[self.pos : self.pos + take])
            self.pos += take
            n = n - take if n > 0 else n
        return b"".join(parts)

    def _check_exit(self) -> None:
        """At the end of the data, a failed command (curl's 404, a missing file) is an error,
        as webdataset's own `Pipe` makes it; its ignored statuses (SIGPIPE) stay ignored."""
        proc = self.proc
        try:
            status = proc.wait(self.timeout if self.timeout > 0 else None)
        except subprocess.TimeoutExpired:
            self._kill()
            raise Stalled(
                f"{self.url}: its command sent all its data but did not exit within "
                f"{self.timeout:g} s"
            ) from None
        if status not in self.ok:
            raise OSError(f"{self.url}: the command exited with status {status}")

    def _kill(self) -> None:
        if self.proc.poll() is None:
            if self.group:  # the command's own session: its children too
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            else:
                self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        """Close early or at the end; a command still running gets `CLOSE_WAIT_S`, then is killed
        (closing its stdout sends a writer SIGPIPE; a hung one would never notice)."""
        self.proc.stdout.close()
        try:
            self.proc.wait(CLOSE_WAIT_S)
        except subprocess.TimeoutExpired:
            self._kill()


def open_shard(url: str, timeout: float):
    """A readable binary stream of the shard (or manifest) at `url`."""
    if is_local(url):
        return open(local_path(url), "rb", buffering=1 << 20)
    if url.startswith(("pipe:", "http://", "https://")):
        pipe = url.startswith("pipe:")
        proc = subprocess.Popen(
            url[5:] if pipe else [*CURL, url],
            shell=pipe,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        return TimedPipe(proc, url, timeout, OK_STATUS["pipe" if pipe else "curl"], group=True)
    from webdataset.gopen import gopen  # other schemes

    stream = gopen(url, "rb")
    if hasattr(stream, "proc") and hasattr(stream, "stream"):  # a webdataset Pipe: can stall
        timed = TimedPipe(stream.proc, url, timeout, tuple(stream.ignore_status))
        timed.owner = stream  # alive while read: its __del__ would close the stdout read here
        return timed
    return stream
