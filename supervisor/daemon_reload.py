"""The daemon's reload: re-read config and units, restart exactly the units whose spec
changed (spec equality is the diff), refuse a bad config without touching anything.
Kept out of :mod:`supervisor.daemon` to keep it small; mixed into
:class:`~supervisor.daemon.Daemon`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio

from supervisor import config
from supervisor import events as ev
from supervisor.errors import ConfigError, ConfigRejected, ControlError, HostvisorError
from supervisor.events import EventBus, Redactor
from supervisor.ordering import in_stop_order
from supervisor.spec import Loaded, ServiceSpec

if TYPE_CHECKING:
    from supervisor.daemonlog import DaemonLog

__all__ = ["ReloadMixin"]


class ReloadMixin:
    """``reload`` (control method and SIGHUP) of :class:`~supervisor.daemon.Daemon`."""

    loaded: Loaded
    bus: EventBus
    redactor: Redactor
    log: DaemonLog | None
    docker_driver: Any
    installed: Any
    shutting_down: bool
    changed: Any
    _reload_lock: anyio.Lock

    @staticmethod
    def _secrets(loaded: Loaded) -> set[str]:
        raise NotImplementedError

    def _refuse_when_stopping(self) -> None:
        raise NotImplementedError

    async def _retire(self, name: str) -> None:
        raise NotImplementedError

    async def _launch(self, spec: ServiceSpec) -> None:
        raise NotImplementedError

    async def reload(self) -> dict[str, Any]:
        """Re-read config and units; restart only what changed.

        Raises:
            ConfigRejected: the new config is invalid; nothing was changed.
        """
        async with self._reload_lock:
            self._refuse_when_stopping()
            return await self._reload()

    async def _reload(self) -> dict[str, Any]:
        path = self.loaded.daemon.config_path
        try:
            new = await anyio.to_thread.run_sync(config.load, path)
        except Exception as exc:  # ConfigError, or anything a hostile file provokes
            errors = (
                [str(issue) for issue in exc.issues]
                if isinstance(exc, ConfigError)
                else [f"{path}: cannot read the config: {type(exc).__name__}: {exc}"]
            )
            self.bus.publish(
                ev.CONFIG_REJECTED,
                message=f"reload rejected, {len(errors)} error(s): " + "; ".join(errors),
                attributes={"hostvisor.config.errors": errors},
            )
            raise ConfigRejected("config rejected: " + "; ".join(errors), data=errors) from None
        self._warn_daemon_changes(new)
        self._refuse_new_code(new)
        old = self.loaded.services
        added = sorted(set(new.services) - set(old))
        removed = sorted(set(old) - set(new.services))
        changed = sorted(n for n in set(old) & set(new.services) if old[n] != new.services[n])
        unchanged = sorted(n for n in set(old) & set(new.services) if old[n] == new.services[n])
        self.redactor.update(self._secrets(new))
        self.loaded = new
        # Dependents first, as at shutdown: by the graph of the config being replaced.
        await in_stop_order(removed + changed, old, self._retire)
        for name in changed + added:
            if not self.shutting_down:  # a shutdown began meanwhile: launch nothing new
                await self._launch(new.services[name])
        result = {"added": added, "removed": removed, "changed": changed, "unchanged": unchanged}
        self.changed.fire()  # the status page follows a new [daemon] status_page at once
        self.bus.publish(
            ev.DAEMON_RELOADED,
            message=f"reloaded: {len(added)} added, {len(removed)} removed, {len(changed)} changed",
            attributes={"hostvisor.reload." + k: v for k, v in result.items()},
        )
        return result

    def _refuse_new_code(self, new: Loaded) -> None:
        """Refuse a reload that would import a module of ours for the first time from files
        an upgrade replaced (the Docker driver, the job modules): ``hostvisor reexec`` first."""
        from supervisor.upgrade import guard_lazy_import

        lazy = []
        if self.docker_driver is None and any(s.kind == "container" for s in new.services.values()):
            lazy.append("supervisor.drivers.docker")
        if any(s.is_job for s in new.services.values()):
            # The first job of this daemon's life brings the job modules (and croniter).
            lazy += ["supervisor.job", "supervisor.schedule"]
        try:
            for module in lazy:
                guard_lazy_import(self.installed, module)
        except HostvisorError as exc:
            self.bus.publish(ev.CONFIG_REJECTED, message=f"reload rejected: {exc}")
            raise ConfigRejected(f"reload rejected: {exc}", data=[str(exc)]) from None

    def _warn_daemon_changes(self, new: Loaded) -> None:
        """Say which ``[daemon]``/``[telemetry]`` changes a reload cannot apply (a revoked
        ``allow_uids`` must not look applied)."""
        before, after = self.loaded.daemon, new.daemon
        pending = [
            key
            for key in ("socket", "state_dir", "allow_uids", "log_level", "telemetry")
            if getattr(before, key) != getattr(after, key)
        ]
        if pending and self.log is not None:
            self.log.write(
                "warning",
                f"reload: {', '.join(pending)} changed in {after.config_path}; these apply "
                "only when the daemon restarts (`systemctl --user restart hostvisor`, or stop "
                "and run it again)",
            )

    async def _reload_on_signal(self, notifier: Any) -> None:
        notifier.reloading()
        try:
            await self.reload()
        except (ConfigRejected, ControlError):
            pass  # published as an event; the running config stays in force
        except Exception as exc:  # a bug in the reload itself must not end the daemon
            if self.log is not None:
                import traceback

                self.log.write(
                    "error",
                    f"reload failed: {type(exc).__name__}: {exc}",
                    traceback=traceback.format_exc(),
                )
        notifier.ready()
