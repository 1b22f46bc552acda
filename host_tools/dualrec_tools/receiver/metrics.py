"""Prometheus text-format metrics of the receiver (prometheus_client), served at /metrics on
the admin listener (loopback) or a listener of its own, never on the mutual-TLS upload port.

Per enrolled device (label `device`, a device id: no customer data in any label): last contact,
headers, payloads, backlog, payload bytes, missing seqs, forks, problems by kind, clock synced and
error bound (from the newest header's `clock`), firmware, certificate expiry, segments deleted by
retention; from the box's own latest state report (PUT /v1/devices/{device}/report): spool use
over quota, free bytes, the number of active faults and when it reported. Receiver-wide:
connections, refusals and cuts by reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from dualrec_tools.receiver.guard import Guard
from dualrec_tools.receiver.storage import DeviceFigures, Storage

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ReceiverCollector(Collector):
    def __init__(self, store: Storage, guard: Guard | None,
                 extra: Callable[[], dict[str, float]] | None = None) -> None:
        self.store, self.guard, self.extra = store, guard, extra

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | InfoMetricFamily]:
        figures = self.store.figures()
        yield from _device_metrics(figures)
        if self.guard is not None:
            yield from _guard_metrics(self.guard)
        if self.extra is not None:
            for name, value in self.extra().items():
                yield GaugeMetricFamily(name, name.replace("_", " "), value=value)


def _gauge(name: str, doc: str, figures: list[DeviceFigures],
           value: Callable[[DeviceFigures], float | None]) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=["device"])
    for f in figures:
        v = value(f)
        if v is not None:
            g.add_metric([f.device], float(v))
    return g


def _device_metrics(figures: list[DeviceFigures]) -> Iterator[GaugeMetricFamily
                                                             | CounterMetricFamily
                                                             | InfoMetricFamily]:
    ns = 1e-9
    yield _gauge("dualrec_device_last_contact_timestamp_seconds",
                 "Last authenticated request of the device (UTC seconds)", figures,
                 lambda f: None if f.last_contact_ns is None else f.last_contact_ns * ns)
    yield _gauge("dualrec_device_headers", "Segment headers held (deleted ones included)",
                 figures, lambda f: f.headers)
    yield _gauge("dualrec_device_payloads", "Payloads stored and receipted", figures,
                 lambda f: f.payloads)
    yield _gauge("dualrec_device_backlog", "Headers whose payload is still awaited", figures,
                 lambda f: f.backlog)
    yield _gauge("dualrec_device_payload_bytes", "Bytes of payload stored", figures,
                 lambda f: f.payload_bytes)
    yield _gauge("dualrec_device_highest_seq", "Highest seq held", figures,
                 lambda f: f.highest_seq)
    yield _gauge("dualrec_device_missing_segments",
                 "Seqs below the highest with no header (chain gaps)", figures,
                 lambda f: f.missing)
    yield _gauge("dualrec_device_forks", "Fork and broken-link refusals (repeats counted)",
                 figures, lambda f: f.forks)
    yield _gauge("dualrec_device_deleted_segments", "Segments deleted by retention", figures,
                 lambda f: f.deleted)
    yield _gauge("dualrec_device_clock_synced",
                 "1 if the newest header's clock was synced, else 0", figures,
                 lambda f: None if f.clock_synced is None else int(f.clock_synced))
    yield _gauge("dualrec_device_clock_error_seconds",
                 "Estimated clock error bound of the newest header (-1e-9: unknown)", figures,
                 lambda f: None if f.clock_error_ns is None else f.clock_error_ns * ns)
    yield _gauge("dualrec_device_cert_expiry_timestamp_seconds",
                 "notAfter of the device's enrolled client certificate (UTC seconds)", figures,
                 lambda f: None if f.cert_not_after_ns is None else f.cert_not_after_ns * ns)
    yield _gauge("dualrec_device_spool_used_ratio",
                 "Spool use over its quota, as the box last reported it (0..1, above 1: over)",
                 figures, lambda f: None if f.report is None else f.report.used_ratio)
    yield _gauge("dualrec_device_spool_free_bytes",
                 "Free bytes on the spool's filesystem, as the box last reported it", figures,
                 lambda f: None if f.report is None else f.report.spool_free_bytes)
    yield _gauge("dualrec_device_faults", "Faults active on the box at its last report",
                 figures, lambda f: None if f.report is None else len(f.report.faults))
    yield _gauge("dualrec_device_last_report_timestamp_seconds",
                 "When the receiver stored the box's last state report (UTC seconds)", figures,
                 lambda f: None if f.report is None else f.report.received_ns * ns)
    problems = CounterMetricFamily("dualrec_device_problems",
                                   "Refusals that concern evidence, by kind", labels=["device",
                                                                                      "kind"])
    for f in figures:
        for kind, n in sorted(f.problems.items()):
            problems.add_metric([f.device, kind], n)
    yield problems
    info = InfoMetricFamily("dualrec_device_firmware", "Firmware of the newest header",
                            labels=["device"])
    for f in figures:
        if f.firmware is not None:
            info.add_metric([f.device], {"version": f.firmware[:32]})
    yield info


def _guard_metrics(guard: Guard) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    st = guard.stats
    yield GaugeMetricFamily("dualrec_receiver_connections", "Open upload connections",
                            value=len(guard.conns))
    yield GaugeMetricFamily("dualrec_receiver_handshakes_pending",
                            "Upload connections still in their TLS handshake",
                            value=sum(guard.pending_by_ip.values()))
    yield CounterMetricFamily("dualrec_receiver_connections_accepted",
                              "Connections accepted", value=st.accepted)
    for name, doc, counts in (
            ("dualrec_receiver_tls_refused", "TLS handshakes refused, by reason",
             st.tls_refused),
            ("dualrec_receiver_connections_refused", "Connections refused at a cap, by cap",
             st.conn_refused),
            ("dualrec_receiver_connections_cut", "Connections closed by a limit, by reason",
             st.cut),
            ("dualrec_receiver_refusals", "HTTP refusals on the upload API, by error word",
             st.refused)):
        c = CounterMetricFamily(name, doc, labels=["reason"])
        for reason, n in sorted(counts.items()):
            c.add_metric([reason], n)
        yield c


def render(store: Storage, guard: Guard | None,
           extra: Callable[[], dict[str, float]] | None = None) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReceiverCollector(store, guard, extra))
    return generate_latest(registry)
