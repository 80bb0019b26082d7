"""What to do when a file's download fails: a pure policy (no aria2, no S3, no files, no log).

The download attempt (download.py) reports each failure of a file - an aria2 task error,
bytes that do not match the manifest, peers that bring nothing, no mirror left - with the
file's retry state, and `decide` answers with a `Decision`: the new retry state, one
action, the log line that says what happened, and which mirror's object (if any) is now
known bad. The attempt carries the action out:

| action | what the attempt does |
|---|---|
| `Backoff(delay)` | try the file again after `delay` s, resuming its partial |
| `Represign(delay)` | the same: every try presigns afresh (an expired URL is aria2 code 22) |
| `Restart(delay)` | drop the partial (the server cannot resume it), try again after `delay` s |
| `NextMirror(exclude)` | try again at once without those mirrors |
| `OneMirrorAtATime()` | try again at once, one mirror per try (mixed mirrors sent bad bytes) |
| `HttpOnly()` | drop the partial, try again at once over plain HTTP (never peers again) |
| `GiveUp(message)` | stop the attempt: `DownloadError(message)`, the error the operator sees |
| `AbortOnFullDisk()` | stop the attempt, remove its partials: `DiskSpaceError` |

A decision with `discard` also drops the file's partial bytes without quarantining them
(an object larger than its manifest entry: nothing of it is worth keeping).

`check_task` decides, while a task runs, whether it must be stopped: aria2 reports more
bytes than the manifest signs (an oversize object), or the try ran past its deadline
(`file_deadline`). `judge_source` decides, before a try, whether a mirror's object is
used: not when its HEAD says it is missing or of another size than the manifest's, nor
when it already served bad bytes, has not changed since, and its retry time
(`known_bad_delay` after the last failure: minutes, doubling, capped at hours) has not
come - so a transient corruption heals by itself.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field, replace

from mirror.manifest import FileEntry

from tts_common.backoff import backoff_delay

from .transfer import ERR_CANNOT_RESUME, ERR_DISK_FULL, ERR_HTTP_STATUS, ERR_NOT_FOUND, ERR_TOO_SLOW

# HTTP errors answered by presigning again before the file is given up on.
MAX_REPRESIGNS = 6
# A mirror object that served bad bytes is not fetched again (while unchanged) for
# 10 minutes after its first failure, then 20, 40... at most 6 hours (with jitter).
KNOWN_BAD_RETRY_BASE = 600.0
KNOWN_BAD_RETRY_CAP = 6 * 3600.0


def backoff(failures: int, rng=random) -> float:
    """Seconds before the next try of a file after `failures` failures: from 0.5 s, at most 30 s."""
    return backoff_delay(failures, base=0.5, cap=30.0, rng=rng)


def known_bad_delay(strikes: int, rng=random) -> float:
    """Seconds before an unchanged object that failed `strikes` times is fetched again."""
    return backoff_delay(strikes - 1, base=KNOWN_BAD_RETRY_BASE, cap=KNOWN_BAD_RETRY_CAP, rng=rng)


def utc_text(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def file_deadline(entry: FileEntry, limits: "Limits") -> float | None:
    """Seconds one try of the file may take (None: no deadline)."""
    if limits.file_deadline <= 0:
        return None
    return limits.file_deadline + entry.size / limits.deadline_speed


def oversize_text(mirror: str, entry: FileEntry, length: int) -> str:
    return (f"object too large on mirror {mirror} for file {entry.path} (the manifest signs {entry.size} bytes; "
            f"the mirror sends at least {length})")


def mismatch_text(mirror: str, entry: FileEntry, got_sha256: str, got_size: int) -> str:
    return (f"checksum mismatch on mirror {mirror} for file {entry.path} (expected sha256 {entry.sha256}, "
            f"{entry.size} bytes; got sha256 {got_sha256}, {got_size} bytes)")


# -- what the policy is told --------------------------------------------------------

@dataclass(frozen=True)
class RetryState:
    """One file's history within an attempt (a new attempt starts from zero)."""
    failures: int = 0  # failed tries that count against aria2.max_tries
    presigns: int = 0  # HTTP errors answered by presigning again
    cause: str | None = None  # why the last mirror was given up on: the error the operator sees


@dataclass(frozen=True)
class FileView:
    """What the policy knows of the file besides its history."""
    model: str  # "name/version": the start of every message
    entry: FileEntry
    mirrors: frozenset[str]  # every configured mirror
    excluded: frozenset[str] = frozenset()  # mirrors given up on for this file


@dataclass(frozen=True)
class Limits:
    max_tries: int  # aria2.max_tries
    max_represigns: int = MAX_REPRESIGNS
    file_deadline: float = 600.0  # aria2.file_deadline: seconds every try gets (0: no deadline)...
    deadline_speed: int = 256 * 1024  # ...plus the file's size at this many bytes/s (aria2.file_deadline_speed)


@dataclass(frozen=True)
class TaskFailed:
    """aria2 ended the file's task with an error."""
    code: int
    message: str
    mirrors: tuple[str, ...]  # the mirrors whose URLs the task used, sorted ("?" for an unknown URL)


@dataclass(frozen=True)
class Mismatch:
    """The finished file's size or sha256 is not the manifest's."""
    mirrors: tuple[str, ...]  # mirrors that may have sent the bytes, sorted
    peers: bool  # peers may have sent bytes too
    identified: frozenset[str]  # mirrors whose object identity (HEAD) was read before the try
    got_sha256: str
    got_size: int


@dataclass(frozen=True)
class Oversize:
    """aria2 reported more bytes for the file (its total or completed length) than the manifest signs."""
    mirrors: tuple[str, ...]  # the mirrors whose URLs the task used, sorted
    identified: frozenset[str]  # mirrors whose object identity (HEAD) was read before the try
    length: int  # the largest length aria2 reported


@dataclass(frozen=True)
class TooSlow:
    """The try ran past its deadline, or aria2 dropped a mirror under the lowest speed limit."""
    mirrors: tuple[str, ...]  # the mirrors whose URLs the task used, sorted (web seeds of a torrent)
    peers: bool  # a torrent task: peers were (also) a source
    why: str  # for the operator: "ran past its 612 s deadline", "under the lowest speed limit (aria2 code 5)"


@dataclass(frozen=True)
class PeersStalled:
    """Neither peers nor the mirror as web seed brought a byte for too long."""


@dataclass(frozen=True)
class NoSourceLeft:
    """Every mirror is excluded, missing the object, or known bad for it."""


Failure = TaskFailed | Mismatch | Oversize | TooSlow | PeersStalled | NoSourceLeft


# -- what it answers ----------------------------------------------------------------

@dataclass(frozen=True)
class Backoff:
    delay: float


@dataclass(frozen=True)
class Represign:
    delay: float


@dataclass(frozen=True)
class Restart:
    delay: float


@dataclass(frozen=True)
class NextMirror:
    exclude: frozenset[str]


@dataclass(frozen=True)
class OneMirrorAtATime:
    pass


@dataclass(frozen=True)
class HttpOnly:
    pass


@dataclass(frozen=True)
class GiveUp:
    message: str
    drop_partial: bool = False  # the partial cannot be resumed: do not keep it for the next pass


@dataclass(frozen=True)
class AbortOnFullDisk:
    pass


Action = Backoff | Represign | Restart | NextMirror | OneMirrorAtATime | HttpOnly | GiveUp | AbortOnFullDisk


@dataclass(frozen=True)
class Note:
    """A log event: `level` is a structlog method name; `fields` join the attempt's own."""
    level: str
    event: str
    fields: dict = field(default_factory=dict, hash=False)

    def emit(self, logger, **fields) -> None:
        getattr(logger, self.level)(self.event, **fields, **self.fields)


@dataclass(frozen=True)
class Decision:
    action: Action
    state: RetryState
    note: Note | None = None
    known_bad: str | None = None  # record this mirror's object as serving bad bytes
    discard: bool = False  # drop the partial bytes (not quarantined): none of them is worth keeping


def decide(failure: Failure, state: RetryState, file: FileView, limits: Limits, rng=random) -> Decision:
    """The next step for a file after `failure` (rng: the backoff's jitter)."""
    match failure:
        case TaskFailed():
            return _task_failed(failure, state, file, limits, rng)
        case Mismatch():
            return _mismatch(failure, state, file, limits)
        case Oversize():
            return _oversize(failure, state, file, limits)
        case TooSlow():
            return _too_slow(failure, state, file, limits, rng)
        case PeersStalled():
            return Decision(HttpOnly(), state)
        case NoSourceLeft():
            if state.cause:
                return Decision(GiveUp(f"{file.model}: {state.cause}; no other mirror to try"), state)
            return Decision(GiveUp(f"{file.model}: {file.entry.path}: no mirror left to try "
                                   f"(excluded: {sorted(file.excluded)})"), state)
    raise TypeError(f"not a download failure: {failure!r}")


def _task_failed(failure: TaskFailed, state: RetryState, file: FileView, limits: Limits, rng) -> Decision:
    where, used, code = f"{file.model}: {file.entry.path}", list(failure.mirrors), failure.code
    if code == ERR_DISK_FULL:
        return Decision(AbortOnFullDisk(), state)
    if code == ERR_HTTP_STATUS:
        # Usually 403 from an expired presigned URL: presign again and resume.
        state = replace(state, presigns=state.presigns + 1)
        note = Note("warning", "HTTP error from mirror, presigning again and resuming")
        if state.presigns > limits.max_represigns:
            return Decision(GiveUp(f"{where}: mirrors {used} keep refusing the download "
                                   f"(HTTP error, aria2 code {code})"), state, note)
        return Decision(Represign(backoff(state.presigns - 1, rng) if state.presigns > 1 else 0.0), state, note)
    if code == ERR_TOO_SLOW:
        return _too_slow(TooSlow(failure.mirrors, False, f"under the lowest speed limit (aria2 code {code})"),
                         state, file, limits, rng)
    if code == ERR_NOT_FOUND:
        note = Note("error", "file missing on mirror")
        if not file.mirrors - file.excluded - set(used):
            return Decision(GiveUp(f"{where} is missing on every mirror"), state, note)
        return Decision(NextMirror(frozenset(used)), state, note)
    state = replace(state, failures=state.failures + 1)
    restart = code == ERR_CANNOT_RESUME  # the server cannot continue this partial: start the file over
    note = (Note("warning", "mirror cannot resume, restarting file") if restart else
            Note("warning", "download failed, backing off", {"attempt": state.failures}))
    if state.failures > limits.max_tries:
        return Decision(GiveUp(f"{where}: download failed {state.failures} times (last: aria2 code {code} "
                               f"{failure.message!r} from mirrors {used})", drop_partial=restart), state, note)
    delay = backoff(state.failures, rng)
    return Decision(Restart(delay) if restart else Backoff(delay), state, note)


def _mismatch(failure: Mismatch, state: RetryState, file: FileView, limits: Limits) -> Decision:
    mirrors = list(failure.mirrors)
    cause = mismatch_text(",".join(mirrors + (["peers"] if failure.peers else [])), file.entry,
                          failure.got_sha256, failure.got_size)
    state = replace(state, failures=state.failures + 1, cause=cause)
    # Only bytes a mirror alone sent make its object known bad (peers may have sent these).
    alone = len(mirrors) == 1 and not failure.peers and mirrors[0] in failure.identified
    if state.failures > limits.max_tries:
        action = GiveUp(f"{file.model}: {cause} (after {state.failures} attempts)")
    elif failure.peers:
        action = HttpOnly()  # peers are unauthenticated: fetch it again from the mirrors alone
    elif len(mirrors) == 1:
        action = NextMirror(frozenset(mirrors))
    else:
        action = OneMirrorAtATime()  # bytes came from several mirrors: find the bad one by trying each alone
    return Decision(action, state, Note("error", "checksum mismatch: bytes quarantined"),
                    known_bad=mirrors[0] if alone else None)


def _oversize(failure: Oversize, state: RetryState, file: FileView, limits: Limits) -> Decision:
    """More bytes than signed: stop at once, keep none of them; blame the mirror if it alone sent them."""
    mirrors = list(failure.mirrors)
    cause = oversize_text(",".join(mirrors), file.entry, failure.length)
    state = replace(state, failures=state.failures + 1, cause=cause)
    alone = len(mirrors) == 1 and mirrors[0] in failure.identified
    if state.failures > limits.max_tries:
        action = GiveUp(f"{file.model}: {cause} (after {state.failures} attempts)", drop_partial=True)
    elif len(mirrors) == 1:
        action = NextMirror(frozenset(mirrors))
    else:
        action = OneMirrorAtATime()
    return Decision(action, state, Note("error", "object larger than its manifest entry: download stopped"),
                    known_bad=mirrors[0] if alone else None, discard=True)


def _too_slow(failure: TooSlow, state: RetryState, file: FileView, limits: Limits, rng) -> Decision:
    """Too slow: the next mirror at once; with none left, back off and resume (counted)."""
    if failure.peers:
        return Decision(HttpOnly(), state, Note("warning", "peers and web seed too slow: fetching over HTTP only",
                                                {"why": failure.why}))
    used = sorted(failure.mirrors)
    cause = f"{file.entry.path}: download from mirrors {used} too slow ({failure.why})"
    if file.mirrors - file.excluded - set(used):
        return Decision(NextMirror(frozenset(used)), replace(state, cause=cause),
                        Note("warning", "mirror too slow, trying the next one", {"why": failure.why}))
    state = replace(state, failures=state.failures + 1, cause=cause)
    note = Note("warning", "download too slow, backing off", {"why": failure.why, "attempt": state.failures})
    if state.failures > limits.max_tries:
        return Decision(GiveUp(f"{file.model}: {cause}, {state.failures} times"), state, note)
    return Decision(Backoff(backoff(state.failures, rng)), state, note)


# -- while a task runs: stop it? --------------------------------------------------------

def check_task(entry: FileEntry, total: int, completed: int, elapsed: float, deadline: float | None,
               mirrors: tuple[str, ...], identified: frozenset[str], peers: bool) -> Oversize | TooSlow | None:
    """A running task's report (aria2's total and completed length, seconds since the try
    started) against the manifest and the try's deadline: the failure to act on, if any."""
    length = max(total, completed)
    if length > entry.size:
        return Oversize(mirrors, identified, length)
    if deadline is not None and elapsed > deadline:
        return TooSlow(mirrors, peers, f"ran past its {deadline:.0f} s deadline")
    return None


# -- before a try: which mirrors' objects to use --------------------------------------

@dataclass(frozen=True)
class Use:
    forget_record: bool = False  # the object changed since it was recorded bad: drop the record


@dataclass(frozen=True)
class Skip:
    cause: str  # becomes the file's cause: what the operator sees if no mirror is left
    note: Note


def judge_source(mirror: str, entry: FileEntry, identity: dict | None, record: dict | None,
                 now: float) -> Use | Skip:
    """Use `mirror`'s object for `entry`? `identity`: its HEAD ({"missing": True}, or etag,
    size, last_modified; None if it could not be read); `record`: the known-bad record of
    that object, if any; `now`: the wall clock (epoch seconds)."""
    if (identity or {}).get("missing"):
        return Skip(f"{entry.path} is missing on mirror {mirror}",
                    Note("error", "file missing on mirror", {"mirrors": [mirror]}))
    size = (identity or {}).get("size")
    if isinstance(size, int) and size != entry.size:
        # The object is not the signed file, whatever its bytes: not a byte of it is fetched.
        return Skip(f"{entry.path} on mirror {mirror} is {size} bytes, the manifest signs {entry.size}",
                    Note("error", "object size differs from the manifest, not fetched",
                         {"mirror": mirror, "size": size, "expected_size": entry.size}))
    if not record or record.get("expected_sha256") != entry.sha256:
        return Use()
    if identity is not None and identity == record.get("object"):
        retry = record.get("retry_after", 0)
        if now >= retry:
            return Use()  # unchanged, but its wait is over: fetched again (a transient fault heals)
        etag = identity.get("etag")
        return Skip(f"{record['error']}, first seen {record.get('seen', '?')}; the object is unchanged "
                    f"(ETag {etag}), so it is not fetched again before {utc_text(retry)} (`tts-provisioner "
                    f"known-bad clear` to retry now)",
                    Note("warning", "mirror object known bad, not fetched again",
                         {"mirror": mirror, "etag": etag, "retry_after": utc_text(retry)}))
    # The object changed on the mirror (or cannot be identified): try it again.
    return Use(forget_record=True)
