"""Process-backed environments: a JVM with a capped heap, and a pool of instances.

TextWorld-Express and ScienceWorld run their simulators in a JVM reached over
py4j. Their Python wrappers start that JVM with the default heap (a quarter of
the machine's memory: ~5 GB per ScienceWorld instance; memory and heap caps:
``docs/environments.md``) and offer no option to cap it, so the adapters start
the bundled jar themselves through ``JavaServer`` with ``-Xmx`` (the ``heap``
option, ``JVMHeap``). Every py4j failure (dead process, broken socket,
exception inside the simulator) becomes ``EnvError``: transient, the rollout
runner replaces the instance and retries the episode.

``EnvPool`` lends instances to threads and throws away any instance that
raised ``EnvError``, so a crashed JVM never serves a second episode.
"""

from __future__ import annotations

import importlib
import logging
import re
import subprocess
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Iterator, Sequence

from pydantic import AfterValidator

from ipr_core.envs.base import ConfiguredEnv, Environment, EnvError

log = logging.getLogger(__name__)


def _check_heap(heap: str) -> str:
    if heap and not re.fullmatch(r"\d+[kKmMgG]?", heap):
        raise ValueError(f"heap must be a JVM size such as 256m or 2g (-Xmx; '' for no cap), got {heap!r}")
    return heap


# The ``heap`` option of a JVM-backed adapter: the simulator JVM's -Xmx.
JVMHeap = Annotated[str, AfterValidator(_check_heap)]


def process_rss(pid: int) -> int | None:
    """Resident memory in bytes of process ``pid`` (Linux /proc), or None if unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass(frozen=True)
class JVMOptions:
    """How a simulator's JVM is started."""

    heap: str = "768m"  # -Xmx; none of the bundled simulators needs more for one episode at a time
    serial_gc: bool = True  # one GC thread: less memory and no contention on small machines
    call_timeout_s: float = 300.0  # a hung simulator becomes an EnvError instead of a hung worker
    extra: tuple[str, ...] = ()

    def javaopts(self) -> list[str]:
        opts = [f"-Xmx{self.heap}"] if self.heap else []
        if self.serial_gc:
            opts.append("-XX:+UseSerialGC")
        return opts + list(self.extra)


class JavaServer:
    """One JVM running ``jar``, reached through a py4j gateway.

    ``call(fn, *args)`` runs a gateway call and turns any py4j error into
    ``EnvError``; ``close()`` is idempotent and always reaps the process.
    """

    def __init__(self, jar: str, cwd: str, options: JVMOptions = JVMOptions()):
        from py4j.java_gateway import GatewayParameters, JavaGateway, launch_gateway

        try:
            # die_on_exit: the JVM exits when our process does (its stdin closes).
            port, proc = launch_gateway(classpath=jar, die_on_exit=True, cwd=cwd, javaopts=options.javaopts(), return_proc=True)
        except Exception as e:  # java missing, jar unreadable, port not announced
            raise EnvError(f"could not start the JVM for {jar}: {e}") from e
        self._proc: subprocess.Popen = proc
        params = GatewayParameters(auto_field=True, port=port, read_timeout=options.call_timeout_s)
        self._gateway = JavaGateway(gateway_parameters=params, java_process=proc)
        self._broken = False
        self.jar = jar

    @property
    def jvm(self) -> Any:
        return self._gateway.jvm

    @property
    def pid(self) -> int:
        return self._proc.pid

    def alive(self) -> bool:
        """False once the process exited or a call failed (its state is then unknown)."""
        return not self._broken and self._proc.poll() is None

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        from py4j.protocol import Py4JError

        if self._proc.poll() is not None:
            raise EnvError(f"JVM (pid {self.pid}, {self.jar}) exited with status {self._proc.returncode}")
        if self._broken:
            raise EnvError(f"JVM (pid {self.pid}, {self.jar}) failed earlier; reset() starts a new one")
        try:
            return fn(*args)
        except Py4JError as e:
            # A Java exception or a timeout may leave the simulator half-way through
            # a step: never trust this process again.
            self._broken = True
            raise EnvError(f"JVM call failed ({type(e).__name__}): {str(e)[:300]}") from e

    def rss_bytes(self) -> int | None:
        """Resident memory of the JVM process (Linux /proc), or None if unknown."""
        return process_rss(self.pid)

    def close(self) -> None:
        if getattr(self, "_gateway", None) is None:
            return
        gateway, self._gateway = self._gateway, None
        try:
            gateway.shutdown()
        except Exception:  # already dead: nothing to shut down politely
            pass
        if self._proc.poll() is None:
            try:  # py4j's die_on_exit listener exits on a line on stdin
                self._proc.stdin.write(b"\n")
                self._proc.stdin.flush()
            except (OSError, ValueError):
                pass
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


@dataclass(frozen=True)
class Simulator:
    """A simulator shipped as a jar inside its Python package."""

    title: str  # for messages: "ScienceWorld"
    package: str  # whose ``constants`` module has JAR_PATH and BASEPATH (its working directory)
    interface: str  # the Java class the Python side talks to, dotted

    def jar(self) -> tuple[str, str]:
        constants = importlib.import_module(f"{self.package}.constants")
        return constants.JAR_PATH, constants.BASEPATH

    def open(self, server: "JavaServer") -> Any:
        """A new instance of ``interface`` in ``server``'s JVM."""

        def new() -> Any:
            cls = server.jvm
            for part in self.interface.split("."):
                cls = getattr(cls, part)
            return cls()

        return server.call(new)


class JVMBackedEnv(ConfiguredEnv):
    """What the JVM-backed adapters (TextWorld-Express, ScienceWorld) share: the
    simulator's ``JavaServer`` (heap from the ``heap`` option), (re)started between
    episodes, calls into it, the gold action sequence, and the process's identity.

    An adapter names its simulator (``class X(JVMBackedEnv, ..., simulator=Simulator(...))``),
    may extend ``_open_api`` (the interface on a fresh server) and drops state
    tied to one server (a loaded task) in ``_forget_server_state``.
    """

    _simulator = Simulator("simulator", "", "")
    _server: "JavaServer | None" = None
    _api: Any = None

    def __init_subclass__(cls, *, simulator: Simulator | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if simulator is not None:
            cls._simulator = simulator

    @property
    def _jvm_options(self) -> JVMOptions:
        heap = getattr(self.options, "heap", None)
        return JVMOptions(heap=heap) if heap is not None else JVMOptions()

    def _open_api(self, server: JavaServer) -> Any:
        return self._simulator.open(server)

    def _forget_server_state(self) -> None:
        pass

    def _ensure_server(self) -> Any:
        """The simulator's interface, (re)started if it is not running: entry points
        (list_tasks, reset, expert) heal a crashed instance here."""
        if self._server is not None and not self._server.alive():
            self._stop_server()
        if self._server is None:
            jar, cwd = self._simulator.jar()
            server = JavaServer(jar, cwd, self._jvm_options)
            try:
                api = self._open_api(server)
            except BaseException:
                server.close()
                raise
            self._server, self._api = server, api
        return self._api

    def _stop_server(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self._forget_server_state()

    def _call(self, method: str, *args: Any) -> Any:
        # Never restarts the JVM: mid-episode a fresh simulator would silently
        # lose the episode's state. Entry points (list_tasks, reset, expert) heal.
        if self._server is None:
            raise EnvError(f"the {self._simulator.title} JVM is not running; reset() starts it")
        # The attribute lookup goes inside call(): with auto_field py4j asks the JVM
        # whether ``method`` is a field, so a dead JVM fails on the lookup itself.
        return self._server.call(lambda *a: getattr(self._api, method)(*a), *args)

    def _gold_actions(self) -> list[str] | None:
        """The loaded game's gold action sequence, None when the simulator has none.
        Ends any running episode: the gold game is not one."""
        gold = [str(a) for a in self._call("getGoldActionSequence")]
        self._done = True
        if not gold or gold[0].startswith("ERROR"):
            return None
        return gold

    @property
    def pid(self) -> int | None:
        return self._server.pid if self._server is not None else None

    def rss_bytes(self) -> int | None:
        return self._server.rss_bytes() if self._server is not None else None

    def close(self) -> None:
        self._stop_server()
        self._done = True


class EnvPool:
    """Up to ``size`` environment instances lent to one user at a time.

    Instances are built lazily by ``factory`` and reused (reset is cheap, a JVM
    start is not). An instance whose lease ends with ``EnvError`` is closed and
    dropped; the next lease builds a fresh one.
    """

    def __init__(self, factory: Callable[[], Environment], size: int):
        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size}")
        self._factory = factory
        self._size = size
        self._idle: list[Environment] = []
        self._all: list[Environment] = []
        self._cond = threading.Condition()
        self._closed = False

    @contextmanager
    def lease(self) -> Iterator[Environment]:
        env = self._acquire()
        try:
            yield env
        except EnvError:
            self._discard(env)
            raise
        except BaseException:
            self._release(env)
            raise
        else:
            self._release(env)

    def _acquire(self) -> Environment:
        with self._cond:
            while True:
                if self._closed:
                    raise RuntimeError("the environment pool is closed")
                if self._idle:
                    return self._idle.pop()
                if len(self._all) < self._size:
                    self._all.append(_PENDING)
                    break
                self._cond.wait()
        try:
            env = self._factory()
        except BaseException:
            with self._cond:
                self._all.remove(_PENDING)
                self._cond.notify()
            raise
        with self._cond:
            self._all[self._all.index(_PENDING)] = env
        return env

    def _release(self, env: Environment) -> None:
        with self._cond:
            self._idle.append(env)
            self._cond.notify()

    def _discard(self, env: Environment) -> None:
        log.warning("environment %s failed; replacing the instance", getattr(env, "name", env))
        with self._cond:
            self._all = [e for e in self._all if e is not env]
            self._cond.notify()
        _close_quietly(env)

    def instances(self) -> Sequence[Environment]:
        with self._cond:
            return [e for e in self._all if e is not _PENDING]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            envs, self._all, self._idle = [e for e in self._all if e is not _PENDING], [], []
            self._cond.notify_all()
        for env in envs:
            _close_quietly(env)

    def __enter__(self) -> "EnvPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_PENDING: Any = object()  # a slot reserved while its instance is being built


def _close_quietly(env: Environment) -> None:
    try:
        env.close()
    except Exception as e:  # closing a crashed instance may fail too
        log.debug("closing %r failed: %s", env, e)
