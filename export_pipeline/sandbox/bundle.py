"""All five simulators (and the S3 server behind the message-log API) on loopback at once.

Used by ``export-pipeline sandbox serve``, ``export-pipeline demo`` and the Dagster-level tests.
``env()`` gives the environment variables that point the project's resources at it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Collection, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from export_pipeline.providers.spec import Sandbox as ProviderSandbox
from export_pipeline.sandbox import deliveries, locations, mapping, mews, stripe
from export_pipeline.sandbox.s3 import S3Server
from export_pipeline.sandbox.server import RunningServer

SIMULATORS = ("locations", "mews", "deliveries", "mapping", "stripe")


# Each simulator's URL and secrets under the names its provider's spec reads them from.
_SIMULATOR_ENV: dict[str, Callable[[Any, str], dict[str, str]]] = {
    "locations": lambda s, url: {"LOCATIONS_API_URL": url, "LOCATIONS_API_TOKEN": s.token},
    "mews": lambda s, url: {
        "MEWS_PLATFORM_ADDRESS": url,
        "MEWS_CLIENT_TOKEN": s.client_token,
        "MEWS_ACCESS_TOKEN": s.access_token,
    },
    "deliveries": lambda s, url: {"DELIVERIES_API_URL": url, "DELIVERIES_API_KEY": s.token},
    "mapping": lambda s, url: {"MAPPING_API_URL": url, "MAPPING_API_TOKEN": s.token},
    # Stripe's origins are optional variables (the spec's origin_env): set, they win.
    "stripe": lambda s, url: {
        "STRIPE_API_URL": url,
        "STRIPE_FILES_URL": s.files_base_url,
        "STRIPE_API_KEY": s.token,
    },
}


@dataclass
class Sandbox:
    states: dict[str, Any]  # provider -> its simulator's State, for the simulators started
    s3: S3Server
    urls: dict[str, str] = field(default_factory=dict)
    # provider -> its file host, for an API whose files are on a host of their own (Stripe)
    files_urls: dict[str, str] = field(default_factory=dict)
    _stack: ExitStack = field(default_factory=ExitStack, repr=False)

    def _state(self, name: str) -> Any:
        if name not in self.states:
            raise LookupError(
                f"the {name} simulator was not started (start_sandbox(only=...); in the tests, "
                "the `simulators` fixture)"
            )
        return self.states[name]

    @property
    def locations(self) -> locations.State:
        return self._state("locations")

    @property
    def mews(self) -> mews.State:
        return self._state("mews")

    @property
    def deliveries(self) -> deliveries.State:
        return self._state("deliveries")

    @property
    def mapping(self) -> mapping.State:
        return self._state("mapping")

    @property
    def stripe(self) -> stripe.State:
        return self._state("stripe")

    def env(self) -> dict[str, str]:
        """Environment variables that point the provider resources at the simulators started."""
        env = {
            "SANDBOX_S3_ENDPOINT_URL": self.s3.endpoint_url,
            "EXPORT_PIPELINE_ALLOWED_DOWNLOAD_HOSTS": self.allowed_download_hosts(),
        }
        for name, state in self.states.items():
            if name in _SIMULATOR_ENV:
                env |= _SIMULATOR_ENV[name](state, self.urls[name])
        return env

    def allowed_download_hosts(self) -> str:
        """The sandbox's own loopback origins: what its download links may point at.

        Loopback is refused by the download policy unless allowed; the sandbox (and the demo,
        ``dev`` and the tests that use it) allow exactly these ports, nothing else.
        """
        origins = [*self.urls.values(), *self.files_urls.values(), self.s3.endpoint_url]
        return ",".join(sorted({httpx.URL(u).netloc.decode("ascii") for u in origins}))

    def simulate_activity(self, changes: int) -> None:
        """Activity since the seed: ``changes`` locations updated and half as many added ("now"),
        so an incremental sync after the demo has rows to load."""
        self.locations.mutate(updated=changes, added=changes // 2)

    def apply_faults(self, faults: Mapping[str, Any]) -> None:
        """Switch on the sandbox's ugly cases by name (``sandbox serve --fault NAME[=VALUE]``).

        ``rate_limit=N`` (the next N calls of every API answer 429), ``slow=SECONDS`` (exports
        take that long to become ready), ``fail_next_export`` (the next locations export
        fails), ``truncate_next_download`` (the next locations file is cut short).
        """
        s = self.states
        for name, value in faults.items():
            if name == "rate_limit":
                for sim in ("locations", "deliveries", "stripe"):
                    if sim in s:
                        s[sim].rate_limit_next = int(value)
            elif name == "slow":
                for sim, attr in (
                    ("locations", "ready_after_seconds"),
                    ("mews", "processing_seconds"),
                    ("mapping", "ready_after_seconds"),
                    ("stripe", "ready_after_seconds"),
                ):
                    if sim in s:
                        setattr(s[sim], attr, float(value))
            elif name == "fail_next_export":
                self.locations.fail_next_export = ("EXPORT_FAILED", str(value or "sandbox fault"))
            elif name == "truncate_next_download":
                self.locations.truncate_next_download = True
            else:
                raise ValueError(f"unknown sandbox fault {name!r} (one of {', '.join(FAULTS)})")

    def stop(self) -> None:
        self._stack.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _declared(name: str) -> ProviderSandbox:
    from export_pipeline.providers.registry import provider_class

    sandbox = provider_class(name).sandbox
    if sandbox is None:
        raise KeyError(f"{name} declares no sandbox simulator")
    return sandbox


FAULTS = ("rate_limit", "slow", "fail_next_export", "truncate_next_download")

# The S3 server behind the message-log API (not a provider: no declaration of its own).
S3_PORT = 8705


def fixed_ports() -> dict[str, int]:
    """``sandbox serve --fixed-ports``: each provider's declared simulator port, and S3's."""
    from export_pipeline.providers.registry import PROVIDERS

    ports = {cls.name: cls.sandbox.port for cls in PROVIDERS if cls.sandbox is not None}
    files = {
        f"{cls.name}_files": cls.sandbox.files_port
        for cls in PROVIDERS
        if cls.sandbox is not None and cls.sandbox.files_port is not None
    }
    return {**ports, **files, "s3": S3_PORT}


def start_sandbox(
    ports: Mapping[str, int] | None = None,
    *,
    n_locations: int = 500,
    locations_options: Mapping[str, Any] | None = None,
    mews_options: Mapping[str, Any] | None = None,
    s3: S3Server | None = None,
    mapping_jobs: Mapping[str, int] | None = None,
    only: Collection[str] = SIMULATORS,
) -> Sandbox:
    """Start the simulators named in ``only`` (default: all); ``ports`` maps provider -> port
    (0 or missing = any free port).

    ``mapping_jobs`` (job id -> results) are mapping jobs the mapping.travel simulator serves
    from the start, so the ``mapping/results`` partitions have something to export.
    """
    ports = dict(ports or {})
    stack = ExitStack()
    try:
        if s3 is None:  # tests share one S3 server across the session
            s3 = S3Server(port=ports.get("s3", 0)).start()
            stack.callback(s3.stop)
        unknown = set(only) - set(SIMULATORS)
        if unknown:
            raise ValueError(f"no simulator {sorted(unknown)}; known: {', '.join(SIMULATORS)}")
        now = datetime.now(UTC)
        make: dict[str, Callable[[], Any]] = {
            "locations": lambda: locations.State(
                n_locations=n_locations, **dict(locations_options or {})
            ),
            "mews": lambda: mews.State(**dict(mews_options or {})),
            # The message log covers the last week up to now, so time windows find rows.
            "deliveries": lambda: deliveries.State(
                s3=s3, log_start=now - timedelta(days=7), log_span=timedelta(days=7)
            ),
            "mapping": mapping.State,
            "stripe": stripe.State,
        }
        states: dict[str, Any] = {name: make[name]() for name in SIMULATORS if name in only}
        for job_id, n_results in (mapping_jobs or {}).items():
            if "mapping" in states:
                states["mapping"].add_job(n_results, job_id=job_id)
        urls, files_urls = {}, {}
        for name, state in states.items():
            # The simulator module each provider declares (ExportProvider.sandbox).
            declared = _declared(name)
            module = importlib.import_module(declared.module)
            if declared.files_port is not None:  # its file host first: the API links to it
                files = RunningServer(
                    module.create_files_app(state), port=ports.get(f"{name}_files", 0)
                ).start()
                stack.callback(files.stop)
                files_urls[name] = state.files_base_url = files.base_url
            server = RunningServer(module.create_app(state), port=ports.get(name, 0)).start()
            stack.callback(server.stop)
            urls[name] = server.base_url
        for state in states.values():
            if hasattr(state, "close"):
                stack.callback(state.close)
        return Sandbox(states=states, s3=s3, urls=urls, files_urls=files_urls, _stack=stack)
    except BaseException:
        stack.close()
        raise
