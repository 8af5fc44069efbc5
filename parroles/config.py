"""``ParallelRoleConfig``: how a batch runs, validated when it is built."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from parroles import backends
from parroles.errors import BackendUnavailable, ConfigError
from parroles.results import bytes_of, check_retry_on, threads_error

DEFAULT_MAX_OUTPUT_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_LOG_BYTES = 8 * 1024 * 1024
DEFAULT_LEDGER = ".parroles/ledger.duckdb"
LEDGER_ENV = "PARROLES_LEDGER"
ORDERS = ("longest_first", "given")  # the order ready roles start in (``runner.ready``)


def default_ledger_path() -> str:
    """The ledger used when none is given: ``$PARROLES_LEDGER``, else ``.parroles/ledger.duckdb``."""
    return os.environ.get(LEDGER_ENV) or DEFAULT_LEDGER


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _seconds(name: str, value: Any, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be a number of seconds {bound}, got {value!r}")
    return float(value)


def retry_on_of(value: Any, name: str) -> tuple[str, ...]:
    """A ``retry_on`` (a list or tuple of strings), checked; ConfigError naming ``name`` otherwise."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{name} must be a list of reasons, exception type names or 'exit:N', got {value!r}")
    try:
        return check_retry_on(value)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _check_backend(backend: Any, address: Any) -> None:
    if backend not in backends.NAMES:
        raise ConfigError(f"backend must be one of {', '.join(backends.NAMES)}, got {backend!r}")
    if address is not None and (backend != "dask" or not isinstance(address, str) or not address):
        raise ConfigError(f"dask_address needs backend='dask' and a scheduler address, got {address!r}")
    if (install := backends.missing_requirement(backend)) is not None:
        raise BackendUnavailable(f"the {backend} backend is not installed: {install}")


def _field(default: Any, help: str, *, spec: str | None = "", option: str | None = None,
           factory: Any = None, choices: tuple[str, ...] | None = None) -> Any:
    """A config field and what is said of it once: its help, its key in a spec's ``[batch]`` (``""``: its
    own name; None: not a spec key), its option of ``parroles run`` (None: none), and the values it takes
    when they are a few names."""
    metadata = {"help": help, "spec": spec, "option": option, "choices": choices}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class ParallelRoleConfig:
    """How a batch runs; each field's help below (``FIELD_HELP``) is what the spec and the CLI say of it."""

    max_concurrent: int = _field(4, "roles running at once, each in its own worker process",
                                 option="--max-concurrent")
    fail_fast: bool = _field(False, "on the first FAILED role, cancel the rest (queued ones never start)",
                             option="--fail-fast/--no-fail-fast")
    role_timeout: float | None = _field(None, "seconds a role may run before it is told to stop (none: no limit)",
                                        option="--timeout")
    cancel_grace: float = _field(5.0, "seconds a told-to-stop role has before its worker is killed")
    role_timeouts: Mapping[str, float] = _field(
        None, "per-role overrides of role_timeout, by role name (a spec gives each role its own timeout)",
        spec=None, factory=dict)
    max_output_bytes: int = _field(DEFAULT_MAX_OUTPUT_BYTES, "largest output JSON a role may return")
    backend: str = _field("loky", "where roles run: loky (worker processes here) or dask (a Dask cluster)",
                          option="--backend", choices=backends.NAMES)
    dask_address: str | None = _field(
        None, "the Dask scheduler, e.g. tcp://host:8786 (implies the dask backend; none: a LocalCluster for "
              "the batch)", spec="scheduler", option="--scheduler")
    connect_timeout: float = _field(10.0, "seconds to wait for the Dask scheduler (then exit 5, nothing run)",
                                    option="--connect-timeout")
    idle_worker_timeout: float = _field(
        300.0, "seconds the loky workers of a cleanly ended batch are kept for the process's next batch "
               "(like joblib's); 0 stops them at once")
    start_method: str = _field(
        "loky", "how loky workers start: loky (fresh interpreters) or forkserver (forked from a server with "
                "parroles' worker code loaded: a faster, cheaper first batch, but a script needs the "
                "if __name__ == \"__main__\": guard)")
    ledger_wait: float = _field(
        10.0, "seconds to wait for another process's lock on the ledger: at the start (then exit 3, nothing "
              "run) and for the last commit (then the records wait in the journal, durable)",
        option="--ledger-wait")
    strict_handoffs: bool = _field(
        False, "refuse needs the standard vocabulary forbids (coder from planner or fixer; reviewer from "
               "coder; tester from coder or fixer; fixer from reviewer or tester; planner from nobody)")
    capture_output: bool = _field(
        True, "what a role writes to its stdout and stderr (its child processes too) goes to its run's logs")
    max_log_bytes: int = _field(DEFAULT_MAX_LOG_BYTES, "most bytes of output kept per run (a marker says what "
                                                       "was dropped)")
    retries: int = _field(0, "attempts a failed role gets after its first, when its failure is one of retry_on",
                          option="--retries")
    retry_delay: float = _field(1.0, "seconds before a role's second attempt")
    retry_backoff: float = _field(2.0, "each later delay is this many times the one before")
    retry_jitter: float = _field(0.1, "each delay is moved by up to this fraction of it, either way")
    retry_max_delay: float = _field(60.0, "the longest wait before an attempt")
    retry_on: tuple[str, ...] = _field(
        ("crash", "timeout", "memory"), "what earns another attempt: reasons (crash, timeout, memory, error), "
        "exception type names (their subclasses too), exit:N for a command's exit code")
    memory_limit: int | str | None = _field(  # given as text or bytes, kept as bytes
        None, "most resident memory a role and every process it started may use (bytes, or 512MB, 2GiB): "
              "past it they are killed and the run is FAILED, reason memory (loky backend)",
        option="--memory-limit")
    memory_limit_growth: float = _field(1.0, "each retry's memory_limit is this many times the one before")
    threads: int | None = _field(
        None, "threads each role's numeric libraries (BLAS, OpenMP, ...) may use; none: the CPUs shared "
              "among the workers, as joblib does", option="--threads")
    order: str = _field(
        "longest_first", "which ready role starts first: longest_first (the one the ledger's history expects "
                         "to take longest; a role with no history first, in the order given) or given",
        option="--order", choices=ORDERS)
    reuse: bool | str = _field(
        False, "take a role's output from a COMPLETED run of the ledger with the same cache key instead of "
               "running it (true: from any batch; a batch id: from that batch's runs only)",
        option="--reuse/--no-reuse")

    def __post_init__(self) -> None:
        _positive_int("max_concurrent", self.max_concurrent)
        _positive_int("max_output_bytes", self.max_output_bytes)
        _positive_int("max_log_bytes", self.max_log_bytes)
        self._check_retries()
        if self.threads is not None and (problem := threads_error(self.threads)):
            raise ConfigError(problem)
        self._check_memory()
        if self.order not in ORDERS:
            raise ConfigError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if not isinstance(self.reuse, (bool, str)) or self.reuse == "":
            raise ConfigError(f"reuse must be true, false or a batch id, got {self.reuse!r}")
        for flag in ("fail_fast", "strict_handoffs", "capture_output"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        if self.role_timeout is not None:
            object.__setattr__(self, "role_timeout", _seconds("role_timeout", self.role_timeout))
        object.__setattr__(self, "cancel_grace", _seconds("cancel_grace", self.cancel_grace, allow_zero=True))
        if not isinstance(self.role_timeouts, Mapping):
            raise ConfigError(f"role_timeouts must map role names to seconds, got {self.role_timeouts!r}")
        timeouts = {str(k): _seconds(f"role_timeouts[{k!r}]", v) for k, v in self.role_timeouts.items()}
        object.__setattr__(self, "role_timeouts", MappingProxyType(timeouts))
        timeout = _seconds("idle_worker_timeout", self.idle_worker_timeout, allow_zero=True)
        object.__setattr__(self, "idle_worker_timeout", timeout)
        object.__setattr__(self, "connect_timeout", _seconds("connect_timeout", self.connect_timeout))
        object.__setattr__(self, "ledger_wait", _seconds("ledger_wait", self.ledger_wait, allow_zero=True))
        _check_backend(self.backend, self.dask_address)
        if self.start_method not in backends.START_METHODS:
            raise ConfigError(f"start_method must be one of {', '.join(backends.START_METHODS)} on this platform, "
                              f"got {self.start_method!r}")
        if self.backend != "loky" and self.start_method != "loky":
            raise ConfigError(f"start_method applies to the loky backend only (backend {self.backend!r} starts no "
                              "local workers)")

    def _check_memory(self) -> None:
        if self.memory_limit is not None:
            object.__setattr__(self, "memory_limit", bytes_of(self.memory_limit, "memory_limit"))
            if self.backend != "loky":
                raise ConfigError("memory_limit needs the loky backend (on Dask, set the workers' own memory limit)")
        growth = self.memory_limit_growth
        if isinstance(growth, bool) or not isinstance(growth, (int, float)) or not 1 <= growth <= 100:
            raise ConfigError(f"memory_limit_growth must be a number from 1 to 100, got {growth!r}")

    def _check_retries(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ConfigError(f"retries must be an integer >= 0, got {self.retries!r}")
        for name in ("retry_delay", "retry_max_delay", "retry_backoff"):
            object.__setattr__(self, name, _seconds(name, getattr(self, name), allow_zero=True))
        jitter = self.retry_jitter
        if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not 0 <= jitter <= 1:
            raise ConfigError(f"retry_jitter must be a fraction from 0 to 1, got {jitter!r}")
        object.__setattr__(self, "retry_on", retry_on_of(self.retry_on, "retry_on"))

    def backend_options(self) -> backends.BackendOptions:
        """What the chosen backend is given of this config (and nothing more)."""
        if self.backend == "dask":
            return backends.DaskOptions(self.dask_address, self.connect_timeout)
        return backends.LokyOptions(self.max_concurrent, self.idle_worker_timeout, self.start_method)

    def workers_for(self, roles: int) -> int:
        """The workers a batch of ``roles`` roles runs on: one per role, at most ``max_concurrent``."""
        return min(self.max_concurrent, roles)

    def timeout_for(self, role: str) -> float | None:
        return self.role_timeouts.get(role, self.role_timeout)

    def to_json_dict(self) -> dict[str, Any]:
        """The config as stored in the ``batches`` table."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["role_timeouts"] = dict(self.role_timeouts)
        return data


FIELD_HELP: Mapping[str, str] = MappingProxyType(
    {f.name: f.metadata["help"] for f in dataclasses.fields(ParallelRoleConfig)})
ParallelRoleConfig.__doc__ = (ParallelRoleConfig.__doc__ or "") + "\n\n" + "\n".join(
    f"    {name}: {help}." for name, help in FIELD_HELP.items())


def spec_keys() -> dict[str, str]:
    """Each ``[batch]`` key a spec may give, and the config field it sets (from the fields, never copied)."""
    return {(f.metadata["spec"] or f.name): f.name for f in dataclasses.fields(ParallelRoleConfig)
            if f.metadata["spec"] is not None}


def run_options() -> list[tuple[str, dataclasses.Field[Any]]]:
    """Each option of ``parroles run`` that overrides a config field: (its declaration, the field)."""
    return [(f.metadata["option"], f) for f in dataclasses.fields(ParallelRoleConfig) if f.metadata["option"]]
