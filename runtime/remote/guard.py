"""What a client may make an approved-only device do, enforced inside the session process.

A TVM RPC client can call any global function registered in the server's process by name, so the guard
does not only replace ``tvm.rpc.server.load_module``: before the session's RPC loop starts it

- routes every shared-library loader a client can reach (``tvm.rpc.server.load_module``,
  ``ffi.ModuleLoadFromFile``, ``ffi.Module.load_from_file.so``) through ``load_approved``: the file is
  read once, hashed, refused unless the digest is approved, and the very bytes hashed are written to a
  private file that is the one dlopen'ed (a swap of the uploaded file after the check changes nothing);
- confines uploads, downloads and removals to plain file names in the session's folder, and refuses
  uploads above the size limit;
- refuses every other function that loads or writes files, starts processes or connections, or calls
  raw pointers (``refused_names``: a pattern over the registry, so functions a newer TVM adds are
  refused too unless reviewed as harmless in ``REVIEWED_SAFE``).

Every refusal raises ``Refused``, whose text starts with ``REFUSED_MARK``: the client turns it into a
one-line error, and the server logs one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from bndeploy.device_protocol import POLICY_FUNCTION

REFUSED_MARK = "bndeploy device refused: "

UPLOAD, DOWNLOAD, REMOVE, WORKPATH = (f"tvm.rpc.server.{n}" for n in ("upload", "download", "remove", "workpath"))
RPC_LOAD_MODULE = "tvm.rpc.server.load_module"
LOAD_FROM_FILE = "ffi.ModuleLoadFromFile"
LOAD_SO = "ffi.Module.load_from_file.so"
SHARED_LIBRARY_SUFFIXES = (".so", ".dso", ".dylib", ".dll")

# Registry names that touch files, processes, connections or raw code.
RISKY = re.compile(r"(?i)load|file|upload|download|remove|save|systemlib|popen|pipe|connect|compile|link|"
                   r"externc|import_python|process_pool|socket_session|serverloop|eventdriven|callback|"
                   r"static_library|returnexception|removeglobal")
# Risky-looking names that only work in memory, and that loading an approved artifact needs.
REVIEWED_SAFE = frozenset({
    "ffi.Module.load_from_bytes.relax.VMExecutable",  # the Relax VM executable embedded in model.so
    "ffi.Module.load_from_bytes.const_loader",         # constants embedded in model.so
    "runtime.LoadParams", "runtime.SaveParams",        # bytes <-> tensors, in memory
    "runtime.LoadMetaDataFromJSON",
    "vm.builtin.kv_state_remove_sequence", "vm.builtin.tensor_cache.remove", "ffi.ModuleGlobalsRemove",
})
# Needed by nothing bndeploy runs, dangerous to leave: call a raw address, drop a guard from the registry.
ALWAYS_REFUSED = frozenset({"ffi.FunctionFromExternC", "ffi.FunctionRemoveGlobal", "rpc.ReturnException"})


class Refused(RuntimeError):
    """A request the approved-only server does not serve; its text is the one-line reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(REFUSED_MARK + reason)
        self.reason = reason


@dataclass(frozen=True)
class SessionPolicy:
    """What one session may do: ``approved`` digests (None: any library), the upload limit in bytes."""

    approved: frozenset[str] | None
    max_upload: int

    def describe(self) -> dict:
        return {"libraries": "any" if self.approved is None else "approved", "max_upload": self.max_upload}


def refused_names(registered: list[str]) -> set[str]:
    guarded = {UPLOAD, DOWNLOAD, REMOVE, WORKPATH, RPC_LOAD_MODULE, LOAD_FROM_FILE, LOAD_SO}
    risky = {n for n in registered if RISKY.search(n)}
    return (risky - REVIEWED_SAFE - guarded) | ALWAYS_REFUSED


class SessionGuard:
    """Installed once in a session process, before TVM's RPC loop: see the module docstring."""

    def __init__(self, policy: SessionPolicy, workdir: Path, private_dir: Path) -> None:
        self.policy = policy
        self.workdir = Path(workdir)
        self.private_dir = Path(private_dir)  # server-only (0700), never reachable through workpath
        self._load_so = None
        self._loaded = 0

    def install(self) -> None:
        import tvm_ffi

        self._load_so = tvm_ffi.get_global_func(LOAD_SO)  # the real dlopen-based loader, kept here only
        register = lambda name, f: tvm_ffi.register_global_func(name, f, override=True)  # noqa: E731
        for name in sorted(refused_names(tvm_ffi.registry.list_global_func_names())):
            register(name, refusal(name))
        register(WORKPATH, self.workpath)
        register(UPLOAD, self.upload)
        register(DOWNLOAD, self.download)
        register(REMOVE, self.remove)
        register(RPC_LOAD_MODULE, lambda name: self.load_approved(self.workpath(name)))
        register(LOAD_FROM_FILE, self.load_from_file)
        register(LOAD_SO, lambda path, fmt="so": self.load_approved(path))
        register(POLICY_FUNCTION, lambda: json.dumps(self.policy.describe()))

    # files in the session folder

    def workpath(self, name: str) -> str:
        name = str(name)
        if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
            raise self.refuse(f"file name {name[:80]!r} is not a plain name in the session folder")
        return str(self.workdir / name)

    def upload(self, name: str, data) -> None:
        path = self.workpath(name)
        if len(data) > self.policy.max_upload:
            raise self.refuse(f"upload too large: {len(data)} bytes, the limit is {self.policy.max_upload} "
                              "(--max-upload on the server)")
        write_new_file(Path(path), bytes(data), 0o600, replace=True)

    def download(self, name: str) -> bytearray:
        return bytearray(read_regular_file(self.workpath(name), self.policy.max_upload, self.refuse))

    def remove(self, name: str) -> None:
        path = Path(self.workpath(name))
        if path.is_file():
            path.unlink()

    # loading

    def load_from_file(self, path: str):
        if not str(path).endswith(SHARED_LIBRARY_SUFFIXES):
            raise self.refuse(f"only approved shared libraries load here, not {Path(str(path)).name!r}")
        return self.load_approved(path)

    def load_approved(self, path: str):
        """Read once, hash, refuse unless approved, then dlopen a private copy of exactly those bytes."""
        data = read_regular_file(str(path), self.policy.max_upload, self.refuse)
        digest = hashlib.sha256(data).hexdigest()
        if self.policy.approved is not None and digest not in self.policy.approved:
            raise self.refuse(f"library not approved: sha256 {digest} (the device's owner approves it with "
                              "`bndeploy device serve --allow`)")
        self._loaded += 1
        private = self.private_dir / f"{digest[:16]}-{self._loaded}.so"
        write_new_file(private, data, 0o500, replace=False)
        module = self._load_so(str(private), "so")
        log(f"loaded library sha256 {digest}" + (" (approved)" if self.policy.approved is not None else ""))
        return module

    def refuse(self, reason: str) -> Refused:
        log(f"refused: {reason}")
        return Refused(reason)


def refusal(name: str):
    def refuse(*args):
        log(f"refused: a call of {name}")
        raise Refused(f"{name} is disabled for clients of `bndeploy device serve`")

    return refuse


def read_regular_file(path: str, limit: int, refuse) -> bytes:
    """The file's bytes, read through one descriptor: never a FIFO or device, never more than ``limit``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise refuse(f"cannot open {Path(path).name!r}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise refuse(f"{Path(path).name!r} is not a regular file")
        if info.st_size > limit:
            raise refuse(f"library too large: {info.st_size} bytes, the limit is {limit} (--max-upload on the server)")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise refuse(f"library too large: over {limit} bytes (--max-upload on the server)")
    return data


def write_new_file(path: Path, data: bytes, mode: int, replace: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if replace else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def log(line: str) -> None:
    print(f"bndeploy device: session {os.getpid()}: {line}", file=sys.stdout, flush=True)
