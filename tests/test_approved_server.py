"""The approved-only device server (`bndeploy device serve --allow`, tokens, TLS): runtime/remote/guard.py,
channel.py, guarded.py, tunnel.py, allowlist.py.

A token+TLS tracker and an approved-only server registered with it run on loopback for the module; the
"unapproved" library is a few lines of C whose constructor writes a marker file, so a library that was
loaded leaves a trace. The same flows run on the emulated aarch64 device (qemu-user) at the end, with
a positive control there (the marker does appear once the library is approved).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from test_edge_rpc import (
    EMULATED_START_TIMEOUT,
    EMULATOR,
    LOOPBACK,
    bndeploy_device,
    cross_compiler,
    emulated_device_missing,
    free_port,
    references,
    running,
)

from bndeploy.cli import main as cli
from bndeploy.errors import BndeployError
from bndeploy.files import sha256_of
from bndeploy.layout import ARTIFACT_MANIFEST
from bndeploy.runtime.remote import RpcEndpoint, run_remote
from bndeploy.runtime.remote.channel import Channel, FrameLimit, TooLarge, resolve_token, write_token_file
from bndeploy.runtime.remote.client import load_tvm_client, open_session, tvm_step
from bndeploy.runtime.remote.guard import REVIEWED_SAFE, refused_names

KEY = "approved-x86"
MAX_UPLOAD_MIB = 2
RUN_TIMEOUT = 60.0
CONSTRUCTOR_C = r"""
#include <stdio.h>
__attribute__((constructor)) static void ran(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("the constructor ran\n", f); fclose(f); }
}
"""


# --------------------------------------------------------------------------------------------------
# Fixtures: secrets, libraries, one tracker and one server for the module


@pytest.fixture(scope="module")
def secrets(tmp_path_factory):
    """(token file, certificate, key): the token by `bndeploy device token`, a self-signed EC certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (it makes the test certificate; .ci/install-edge installs it)")
    folder = tmp_path_factory.mktemp("secrets")
    assert cli(["device", "token", str(folder / "token")]) == 0
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "2", "-subj", "/CN=bndeploy-test-device", "-keyout", str(folder / "device.key"),
                    "-out", str(folder / "device.crt")], check=True, capture_output=True)
    return folder / "token", folder / "device.crt", folder / "device.key"


def channel_args(secrets, server: bool = True) -> list[str]:
    token, cert, key = secrets
    return ["--token-file", str(token), "--tls-cert", str(cert)] + (["--tls-key", str(key)] if server else [])


def client_channel(secrets) -> Channel:
    token, cert, _ = secrets
    return Channel(token.read_text().strip(), cert)


@pytest.fixture(scope="module")
def host_artifact(exported, tmp_path_factory):
    from bndeploy.compile import compile_model

    export_dir = exported("conv-bn")["inference"]
    (directory,) = compile_model(export_dir / "model.onnx", ["cpu"], tmp_path_factory.mktemp("approved") / "cpu")
    return directory


def constructor_library(folder: Path, compiler: str = "gcc") -> tuple[Path, Path]:
    """(library, marker): a shared library whose constructor writes ``marker`` when it is loaded."""
    marker = folder / f"constructor-ran-{compiler}"
    source = folder / "constructor.c"
    source.write_text(CONSTRUCTOR_C)
    library = folder / f"constructor-{compiler}.so"
    subprocess.run([compiler, "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(library), str(source)],
                   check=True, capture_output=True)
    return library, marker


@pytest.fixture(scope="module")
def unapproved(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    return constructor_library(tmp_path_factory.mktemp("unapproved"))


@pytest.fixture(scope="module")
def allow_file(host_artifact, tmp_path_factory):
    """The owner's allowlist: the host artifact's library, in sha256sum's format."""
    path = tmp_path_factory.mktemp("allow") / "approved.sha256"
    path.write_text(f"# approved for the test device\n{sha256_of(host_artifact / 'model.so')}  model.so\n")
    return path


@pytest.fixture(scope="module")
def guarded_tracker(secrets):
    port = free_port()
    with running(bndeploy_device("tracker", "--host", LOOPBACK, "--port", str(port), *channel_args(secrets)),
                 "token+TLS tracker") as service:
        yield f"{LOOPBACK}:{port}", service


def serve_command(secrets, allow_file, port: int, *extra: str) -> list[str]:
    return bndeploy_device("serve", "--host", LOOPBACK, "--port", str(port), "--allow", str(allow_file),
                           "--max-upload", str(MAX_UPLOAD_MIB), *channel_args(secrets), *extra)


@pytest.fixture(scope="module")
def guarded_server(secrets, allow_file):
    """An approved-only server with token and TLS, reached directly (no tracker)."""
    port = free_port()
    with running(serve_command(secrets, allow_file, port), "approved-only server") as service:
        yield f"{LOOPBACK}:{port}", service


def wait_for_key(tracker: str, key: str, secrets, timeout: float = 60.0) -> None:
    from bndeploy.runtime.remote import registered_keys, tracker_summary

    host, port = tracker.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if registered_keys(tracker_summary(host, int(port), channel=client_channel(secrets))).get(key):
            return
        time.sleep(0.2)
    raise AssertionError(f"no server registered with key {key!r} at {tracker} within {timeout:g} s")


def direct(guarded_server, secrets, channel: Channel | None = None, timeout: float = RUN_TIMEOUT) -> RpcEndpoint:
    address, _ = guarded_server
    return RpcEndpoint.server(address, timeout=timeout, channel=client_channel(secrets) if channel is None else channel)


def session_for(endpoint: RpcEndpoint):
    load_tvm_client()
    return open_session(endpoint, time.monotonic() + endpoint.timeout)


def upload_and_load(endpoint, library) -> None:
    """Upload ``library`` as constructor.so and load it, in a session of its own that ends here."""
    session = session_for(endpoint)
    try:
        session.upload(str(library), "constructor.so")
        session.load_module("constructor.so")
    finally:
        session = None
        import gc

        gc.collect()


def refusal_of(function, *args) -> str:
    with pytest.raises(BndeployError) as refused:
        tvm_step("calling the device", function, *args)
    return str(refused.value)


def artifact_with_library(source: Path, library: Path, folder: Path) -> Path:
    """A copy of the artifact at ``source`` whose model.so is ``library``, manifest sha256 updated (as
    someone who rebuilt it would have it): the client's own check passes, only the device can refuse."""
    copy = Path(shutil.copytree(source, folder))
    shutil.copyfile(library, copy / "model.so")
    manifest = json.loads((copy / ARTIFACT_MANIFEST).read_text())
    manifest["library"]["sha256"] = sha256_of(copy / "model.so")
    (copy / ARTIFACT_MANIFEST).write_text(json.dumps(manifest))
    return copy


# --------------------------------------------------------------------------------------------------
# Approved artifacts pass; nothing else is loaded


def test_approved_artifact_passes_check_through_the_token_tls_tracker(host_artifact, allow_file, guarded_tracker,
                                                                      secrets):
    from test_edge_rpc import check_remotely

    tracker, tracker_service = guarded_tracker
    command = serve_command(secrets, allow_file, free_port(), "--tracker", tracker, "--key", KEY)
    with running(command, "approved-only server behind the tracker") as server:
        wait_for_key(tracker, KEY, secrets)
        check_remotely(host_artifact, RpcEndpoint.tracker(tracker, KEY, timeout=RUN_TIMEOUT, channel=client_channel(secrets)))
        assert cli(["check", str(host_artifact), "--rpc", tracker, "--key", KEY, *channel_args(secrets, server=False)]) == 0
        with pytest.raises(BndeployError, match="the tracker .* refused the connection: bad token"):
            check_remotely(host_artifact, RpcEndpoint.tracker(tracker, KEY, timeout=10, channel=Channel("w" * 32, secrets[1])))
    assert sum("loaded library sha256" in line and "(approved)" in line for line in server.lines) == 2, server.log()
    assert any("tracker refused 127.0.0.1: bad token" in line for line in tracker_service.lines), tracker_service.log()


def test_unapproved_library_is_refused_and_never_loaded(host_artifact, guarded_server, secrets, unapproved, tmp_path,
                                                        capsys):
    library, marker = unapproved
    digest = sha256_of(library)
    artifact = artifact_with_library(host_artifact, library, tmp_path / "unapproved-artifact")
    inputs, _ = references(host_artifact)
    with pytest.raises(BndeployError, match=f"the device refused .*model.so: library not approved: sha256 {digest}"):
        run_remote(artifact, inputs, direct(guarded_server, secrets))
    assert cli(["check", str(artifact), "--against", "onnxruntime", "--rpc-server", guarded_server[0],
                *channel_args(secrets, server=False)]) == 2
    assert f"library not approved: sha256 {digest}" in capsys.readouterr().err
    assert not marker.exists(), "the unapproved library's constructor ran"
    _, server = guarded_server
    assert any(f"refused: library not approved: sha256 {digest}" in line for line in server.lines), server.log()


def test_raw_loaders_and_other_risky_functions_are_refused(guarded_server, secrets, unapproved):
    """A client can call any registered function by name: the raw loaders must be guarded too."""
    library, marker = unapproved
    session = session_for(direct(guarded_server, secrets))
    try:
        for name, args in (("ffi.Module.load_from_file.so", (str(library), "so")),
                           ("ffi.ModuleLoadFromFile", (str(library),)),
                           ("tvm.rpc.server.load_module", ("../" + library.name,))):
            assert "refused" in refusal_of(session.get_function(name), *args), name
        for name, args in (("rpc.PopenSession", ("/bin/true",)), ("ffi.SystemLib", ("",)),
                           ("relax.ExecutableLoadFromFile", (str(library),)),
                           ("ffi.FunctionRemoveGlobal", ("ffi.ModuleLoadFromFile",))):
            assert f"{name} is disabled" in refusal_of(session.get_function(name), *args)
        assert "not a plain name" in refusal_of(session.upload, str(library), "../escaped.so")
    finally:
        session = None
        import gc

        gc.collect()
    assert not marker.exists(), "a raw loader ran the unapproved library's constructor"


def test_tampered_library_under_an_approved_name_is_refused(host_artifact, guarded_server, secrets, unapproved):
    """The name the client gives means nothing: the server hashes the bytes it would load."""
    library, marker = unapproved
    approved_name = f"bndeploy-{sha256_of(host_artifact / 'model.so')[:16]}.so"
    session = session_for(direct(guarded_server, secrets))
    try:
        session.upload(str(library), approved_name)
        reason = refusal_of(session.load_module, approved_name)
    finally:
        session = None
        import gc

        gc.collect()
    assert f"library not approved: sha256 {sha256_of(library)}" in reason
    assert not marker.exists()


@pytest.mark.parametrize("problem", ["wrong token", "no token", "no TLS", "stock TVM client"])
def test_a_client_without_the_right_token_is_refused_before_any_upload(host_artifact, guarded_server, secrets, problem):
    token, cert, _ = secrets
    channel = {"wrong token": Channel("x" * 32, cert), "no token": Channel(None, cert),
               "no TLS": Channel(token.read_text().strip(), None), "stock TVM client": Channel()}[problem]
    _, server = guarded_server
    sessions_before = sum("connected from" in line for line in server.lines)
    expected = {"wrong token": "refused the connection: bad token", "no token": "cannot find server that matches key",
                "no TLS": "closed the connection at the token handshake", "stock TVM client": "cannot open an RPC session"}
    inputs, _ = references(host_artifact)
    with pytest.raises(BndeployError, match=expected[problem]):
        run_remote(host_artifact, inputs, direct(guarded_server, secrets, channel, timeout=10))
    time.sleep(0.2)
    assert sum("connected from" in line for line in server.lines) == sessions_before, "a session was opened"
    assert "refused 127.0.0.1" in server.lines[-1], server.log()


def test_uploads_above_the_limit_are_refused(host_artifact, guarded_server, secrets, tmp_path):
    big = tmp_path / "big.so"
    big.write_bytes(os.urandom(int((MAX_UPLOAD_MIB + 0.5) * (1 << 20))))
    artifact = artifact_with_library(host_artifact, big, tmp_path / "big-artifact")
    inputs, _ = references(host_artifact)
    with pytest.raises(BndeployError, match="more than the device accepts"):  # the client asks first
        run_remote(artifact, inputs, direct(guarded_server, secrets))
    session = session_for(direct(guarded_server, secrets))  # a client that does not ask
    try:
        assert "upload too large" in refusal_of(session.upload, str(big), "big.so")
    finally:
        session = None
        import gc

        gc.collect()


def test_allowlist_is_reread_when_it_changes(guarded_server, secrets, allow_file, unapproved):
    """Last in the module (it approves the library): the positive control of the marker, too."""
    library, marker = unapproved
    _, server = guarded_server
    server.proc.send_signal(signal.SIGHUP)
    with open(allow_file, "a") as f:
        f.write(f"{sha256_of(library)}  constructor.so\n")
    upload_and_load(direct(guarded_server, secrets), library)
    assert marker.exists(), "once approved, the library loads (and its constructor runs)"
    assert any("allowlist reloaded: 2 approved libraries" in line for line in server.lines), server.log()


# --------------------------------------------------------------------------------------------------
# Refused before anything starts, and the pieces


def test_serving_on_the_network_needs_a_library_policy(capsys):
    assert cli(["device", "serve", "--host", "0.0.0.0", "--port", str(free_port())]) == 2
    assert "would run any library anyone on the network uploads" in capsys.readouterr().err
    assert cli(["device", "serve", "--allow", "x", "--allow-any-library"]) == 2


def test_token_file_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "token"
    write_token_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert resolve_token(None, str(path), environ={}) == path.read_text().strip()
    path.chmod(0o644)
    with pytest.raises(BndeployError, match="chmod 600"):
        resolve_token(None, str(path), environ={})
    with pytest.raises(BndeployError, match="shorter than"):
        resolve_token("short", None, environ={})
    assert resolve_token(None, None, environ={"BNDEPLOY_RPC_TOKEN": "t" * 20}) == "t" * 20
    with pytest.raises(BndeployError, match="already exists"):
        write_token_file(path)


def test_frame_limit_follows_tvm_framing_across_chunks():
    import struct

    limit = FrameLimit(100)
    stream = struct.pack("<Q", 10) + b"x" * 10 + struct.pack("<Q", 100) + b"y" * 100
    for i in range(len(stream)):  # one byte at a time: headers split across reads
        limit.feed(stream[i:i + 1])
    with pytest.raises(TooLarge, match="101 bytes"):
        limit.feed(struct.pack("<Q", 101)[:3])
        limit.feed(struct.pack("<Q", 101)[3:])


def test_every_risky_registered_function_is_refused_or_reviewed():
    """This TVM's registry: the loaders, process and connection starters are refused in a session."""
    import tvm  # noqa: F401
    import tvm_ffi

    names = tvm_ffi.registry.list_global_func_names()
    refused = refused_names(names)
    for name in ("rpc.PopenSession", "rpc.Connect", "rpc.CreatePipeClient", "ffi.SystemLib",
                 "runtime.ModuleLoadStaticLibrary", "relax.ExecutableLoadFromFile", "ffi.ModuleWriteToFile",
                 "runtime.SaveParamsToFile", "runtime.disco._import_python_module", "ffi.FunctionFromExternC"):
        assert name in refused or name not in names, name
    assert not refused & REVIEWED_SAFE


# --------------------------------------------------------------------------------------------------
# The same on the emulated aarch64 device


@pytest.mark.slow
def test_approved_only_serving_on_the_emulated_aarch64_device(exported, guarded_tracker, secrets, tmp_path):
    from bndeploy.compile import compile_model
    from test_edge_rpc import check_remotely

    missing = emulated_device_missing()
    if missing:
        pytest.skip(missing)
    if not shutil.which(cross_compiler("cortex-a78ae")):
        pytest.skip(f"{cross_compiler('cortex-a78ae')} is not installed (.ci/install-edge installs it)")
    (artifact,) = compile_model(exported("conv-bn")["inference"] / "model.onnx", ["cortex-a78ae"], tmp_path / "orin")
    library, marker = constructor_library(tmp_path, cross_compiler("cortex-a78ae"))
    allow = tmp_path / "orin.sha256"
    allow.write_text(f"{sha256_of(artifact / 'model.so')}  model.so\n")
    tracker, _ = guarded_tracker
    key = "orin-approved"
    command = ["bash", str(EMULATOR), "serve", "--host", LOOPBACK, "--port", str(free_port()), "--tracker", tracker,
               "--key", key, "--allow", str(allow), *channel_args(secrets)]
    endpoint = RpcEndpoint.tracker(tracker, key, timeout=180, channel=client_channel(secrets))
    with running(command, "emulated approved-only server", EMULATED_START_TIMEOUT) as server:
        wait_for_key(tracker, key, secrets, EMULATED_START_TIMEOUT)
        check_remotely(artifact, endpoint)
        unapproved_artifact = artifact_with_library(artifact, library, tmp_path / "unapproved")
        inputs, _ = references(artifact)
        with pytest.raises(BndeployError, match=f"library not approved: sha256 {sha256_of(library)}"):
            run_remote(unapproved_artifact, inputs, endpoint)
        session = session_for(endpoint)
        try:
            session.upload(str(library), f"bndeploy-{sha256_of(artifact / 'model.so')[:16]}.so")
            assert "not approved" in refusal_of(session.load_module, f"bndeploy-{sha256_of(artifact / 'model.so')[:16]}.so")
            assert "not approved" in refusal_of(session.get_function("ffi.Module.load_from_file.so"), str(library), "so")
        finally:
            session = None
            import gc

            gc.collect()
        with pytest.raises(BndeployError, match="bad token"):
            run_remote(artifact, inputs, RpcEndpoint.tracker(tracker, key, timeout=30, channel=Channel("w" * 32, secrets[1])))
        assert not marker.exists(), "the unapproved aarch64 library's constructor ran"
        with open(allow, "a") as f:  # positive control: approved, it loads and the marker appears
            f.write(f"{sha256_of(library)}  constructor.so\n")
        upload_and_load(endpoint, library)
        assert marker.exists(), server.log()
