"""Replies over sagad's gRPC API (``SagaService/ReportStepResult``), for participants that may
consume their command queue but not publish to the broker.

Needs the ``grpc`` extra (``pip install "saga-participant[grpc]"``): grpcio and protobuf are
imported only when a participant is given :class:`GrpcReplies`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from . import _json

log = logging.getLogger("saga_participant")

#: sagad refuses these for good (it never sent that command, or the report is invalid): sending
#: the report again cannot help, so the command is acknowledged and the step times out.
_REFUSED = ("NOT_FOUND", "INVALID_ARGUMENT")


@dataclass(frozen=True)
class GrpcReplies:
    """Where and how to report results: ``Participant(..., reply_via_grpc=GrpcReplies(url))``.

    The command is still consumed from RabbitMQ and goes through the same barrier; only its
    reply is sent as a ``ReportStepResult`` call instead of a message, and the command is
    acknowledged once sagad answered. A participant token bound to participants in sagad's
    tokens file (``participants = ["payment"]``) may only report results of commands sent to
    those.

    :param server: sagad's API, ``http://host:50051`` or ``https://host:50051``.
    :param token: a participant token, sent as ``authorization: Bearer <token>``.
    :param ca_certificate: PEM certificate(s) to trust for ``https://`` (default: the system's).
    :param timeout: seconds one report may take before the command is requeued.
    """

    server: str
    token: str | None = field(default=None, repr=False)
    ca_certificate: str | bytes | None = field(default=None, repr=False)
    timeout: float = 10.0

    def target(self) -> tuple[str, bool]:
        """``host:port`` and whether it is TLS; ``ValueError`` for anything else."""
        url = urlsplit(self.server)
        if url.scheme not in ("http", "https") or not url.hostname or url.path not in ("", "/"):
            raise ValueError(
                f"invalid gRPC server {self.server!r}: expected http://HOST:PORT or https://HOST:PORT"
            )
        port = url.port or (443 if url.scheme == "https" else 80)
        host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
        return f"{host}:{port}", url.scheme == "https"


class Refused(Exception):
    """sagad refused a report for good (``NOT_FOUND``, ``INVALID_ARGUMENT``)."""


class Reporter:
    """A ``grpc.aio`` channel to sagad, made in the running event loop; connects on first use,
    so a sagad that is down does not stop the start."""

    def __init__(self, config: GrpcReplies) -> None:
        try:
            import grpc
        except ImportError as e:  # pragma: no cover - depends on the installation
            raise RuntimeError(
                'reply_via_grpc needs grpcio: pip install "saga-participant[grpc]"'
            ) from e
        from ._proto import saga_pb2, saga_pb2_grpc

        target, tls = config.target()
        self._grpc = grpc
        self._pb = saga_pb2
        self._timeout = config.timeout
        self._auth = (("authorization", f"Bearer {config.token}"),) if config.token else ()
        if tls:
            pem = config.ca_certificate
            if isinstance(pem, str):
                pem = pem.encode()
            credentials = grpc.ssl_channel_credentials(root_certificates=pem)
            self._channel = grpc.aio.secure_channel(target, credentials)
        else:
            self._channel = grpc.aio.insecure_channel(target)
        self._stub = saga_pb2_grpc.SagaServiceStub(self._channel)

    async def report(self, reply: str, traceparent: str | None) -> bool:
        """Reports the stored reply; returns sagad's ``applied``. Raises :class:`Refused` for a
        report sagad will never take, any other exception for "try again later"."""
        body: dict[str, Any] = _json.loads(reply)
        success = body["outcome"] == "success"
        output = body.get("output")
        request = self._pb.ReportStepResultRequest(
            command_id=body["command_id"],
            outcome=self._pb.OUTCOME_SUCCESS if success else self._pb.OUTCOME_FAILURE,
            # Empty means null; the stored text keeps exact numbers (Decimal) digit for digit.
            output_json="" if output is None else _json.dumps(output),
            reason=body.get("reason") or "",
            retryable=bool(body.get("retryable", False)),
        )
        metadata = self._auth
        if traceparent is not None:
            metadata = (*metadata, ("traceparent", traceparent))
        try:
            answer = await self._stub.ReportStepResult(
                request, metadata=metadata, timeout=self._timeout
            )
        except self._grpc.aio.AioRpcError as e:
            if e.code().name in _REFUSED:
                raise Refused(f"{e.code().name}: {e.details()}") from None
            raise ConnectionError(f"ReportStepResult: {e.code().name}: {e.details()}") from None
        return bool(answer.applied)

    async def close(self) -> None:
        await self._channel.close()
