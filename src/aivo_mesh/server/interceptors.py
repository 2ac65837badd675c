"""Server adapter: one guard that checks and observes every handler of a grpc.aio server.

The guard wraps each RpcMethodHandler's behaviour (the only place `auth_context()` is reachable) for
the four arities, once per method. `GuardedServer` wraps handlers as they are registered, so a call
pays for no interceptor: grpc.aio runs interceptors per call, as a coroutine each, and every wrapping
again (about 10 us of Python per call). With interceptors of the user's own, the guard is the first
interceptor instead (`MeshServerInterceptor`), so it still runs before theirs. Per call it:
1. rejects any TLS version but 1.3 (belt and braces: aivo_mesh.tls already refuses 1.2 at the handshake);
2. checks the client certificate against the mesh's peer policy (pki/peer.py), takes the caller's
   identity from it and checks the allow-list; a connection verified before (its session token, address
   and names: authz.VerifiedSessions) is not checked again, only its identity read back;
   then takes a token of the method's rate limit (server/ratelimit.py): after the allow-list, so a caller
   that is refused never spends one; an empty bucket refuses with RESOURCE_EXHAUSTED and a
   `grpc-retry-pushback-ms` trailer, the milliseconds until its next token;
3. publishes the caller and the inbound deadline in context variables, so a handler that calls
   another service passes on its remaining deadline (see policy.deadline.inbound_deadline);
4. tells each ServerCallObserver (metrics, tracing, logs) when the call starts and how it ended;
5. injects mesh.yaml's faults into admitted calls (policy.fault decides): waits the delay, then answers
   the abort status instead of calling the handler, as Envoy's fault filter after the RBAC filter.
Observers see denied and faulted calls too: a PERMISSION_DENIED is an outcome operators must be able to count.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

import grpc
from grpc.aio._server import Server as _AioServer  # grpc.aio.server() builds this class; no public name

from aivo_mesh.pki.peer import PeerPolicy, PeerRefused, Rule
from aivo_mesh.policy.backoff import PUSHBACK_HEADER
from aivo_mesh.policy.core import ATTEMPT_HEADER, SESSION_AGENT, monotonic
from aivo_mesh.policy.deadline import inbound_deadline
from aivo_mesh.policy.events import ServerCall, ServerCallObserver
from aivo_mesh.policy.fault import ABORT_DETAILS, Fault, FaultInjector
from aivo_mesh.server.authz import Authorizer, VerifiedSessions, peer_identity, tls_version
from aivo_mesh.server.ratelimit import InboundRateLimits

log = logging.getLogger(__name__)

# The method label of calls to a method this server does not have: one value, whatever the path
# (a caller's typo or a scan must not create a series per path).
UNKNOWN_METHOD = "unknown"

current_caller: ContextVar[str | None] = ContextVar("aivo_mesh_current_caller", default=None)

# (method, invocation metadata) of the call whose handler was just looked up, from grpc's HandlerCallDetails.
# grpc.aio looks a call's handler up in the task that then runs it, so the guard finds its call's metadata
# here rather than asking `context.invocation_metadata()`, which builds the tuple anew on every read
# (1.7 us of the server's event loop per call). Anything else (another method, nothing set) falls back to
# the context. Even a stale entry could not admit anyone: the session key is also the call's own peer
# address and certificate names (authz.VerifiedSessions).
_looked_up: ContextVar[tuple[str, Sequence[tuple[str, Any]]] | None] = ContextVar("aivo_mesh_looked_up",
                                                                                  default=None)


def _note_lookup(details: grpc.HandlerCallDetails) -> None:
    _looked_up.set((details.method, details.invocation_metadata))

REQUIRED_TLS = "TLSv1.3"


class Denied(Exception):
    def __init__(self, code: grpc.StatusCode, details: str, refusal: str | None = None,
                 trailers: tuple[tuple[str, str], ...] = (), rate_limited: bool = False) -> None:
        self.code = code
        self.details = details
        self.refusal = refusal
        self.trailers = trailers
        self.rate_limited = rate_limited
        super().__init__(details)


_SESSION_PREFIX = SESSION_AGENT + "/"


def _metadata(md: Sequence[tuple[str, Any]]) -> tuple[tuple[str, str], ...]:
    """What observers see of a call's metadata: its text entries, the user agent without the session
    token (a secret)."""
    return tuple((k, _split_agent(v)[1] if k == "user-agent" else v) for k, v in md if isinstance(v, str))


def _split_agent(agent: str) -> tuple[str | None, str]:
    """(the session token, the rest) of a user agent whose first product is the session (MeshClient's
    endpoint channels put it there); (None, the user agent) of any other."""
    if not agent.startswith(_SESSION_PREFIX):
        return None, agent
    token, _, rest = agent[len(_SESSION_PREFIX):].partition(" ")
    return token, rest


def _session_token(md: Sequence[tuple[str, Any]]) -> str | None:
    for k, v in md:
        if k == "user-agent":
            return _split_agent(v)[0] if isinstance(v, str) else None
    return None


def _final_code(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    code = context.code()
    if code is not None:
        return str(code.name) if isinstance(code, grpc.StatusCode) else _code_name(code)
    if error is None:
        return "OK"
    if isinstance(error, BaseException) and error.__class__.__name__ == "CancelledError":
        # grpc cancels the handler both when the caller cancels and when the deadline passes; the
        # caller sees DEADLINE_EXCEEDED in the second case, and so must metrics and logs.
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    return "UNKNOWN"


def _code_name(code: object) -> str:
    for sc in grpc.StatusCode:
        if sc.value[0] == code:
            return str(sc.name)
    return "UNKNOWN"


class MeshServerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, authorizer: Authorizer | None, *, service: str = "", require_tls: bool = True,
                 observers: Sequence[ServerCallObserver] = (), peer_policy: PeerPolicy | None = None,
                 rate_limits: InboundRateLimits | None = None) -> None:
        self._authz = authorizer
        # None: nothing is limited here (a plaintext server behind a sidecar: the sidecar limits).
        self.rate_limits = rate_limits
        self._service = service or (authorizer.service if authorizer else "")
        self._require_tls = require_tls
        self.observers: list[ServerCallObserver] = list(observers)
        # Replaced whole when mesh.yaml's certificates block changes (MeshServer.set_peer_policy); the
        # connections verified under the old one are then verified again (`_sessions` follows it).
        self.peer_policy = peer_policy or PeerPolicy(authorizer.trust_domain if authorizer else "")
        self._sessions = VerifiedSessions(self.peer_policy)
        self._reported: set[tuple[str, str]] = set()
        # Told of every refused call before it is aborted (MeshServer reports TLS-version refusals).
        self.on_denied: Callable[[grpc.aio.ServicerContext, Denied], None] | None = None
        # Replaced whole when the fault configuration changes (MeshServer.set_faults); None: no faults.
        self.faults: FaultInjector | None = None
        # Told of every fault before it is applied (method, fault): MeshServer counts them.
        self.on_fault: Callable[[str, Fault], None] | None = None
        # (method, id(handler)) -> (handler, its guarded handler): the wrapping is the same for every call.
        self._guarded: dict[tuple[str, int], tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def set_authorizer(self, authorizer: Authorizer) -> None:
        """Decide calls admitted from now on by `authorizer` (calls in flight were admitted already).
        Ignored on a plaintext server, which has no identities to decide on."""
        if self._authz is not None:
            self._authz = authorizer

    def _refused(self, exc: PeerRefused, context: grpc.aio.ServicerContext) -> Denied:
        # One log line per refused certificate and rule, not per call: a client retrying with a revoked
        # certificate must not flood the log (the metric counts every call).
        key = (exc.detail, context.peer())
        if key not in self._reported and len(self._reported) < 1024:
            self._reported.add(key)
            log.warning("client certificate refused", extra={
                "peer": context.peer(), "rule": str(exc.rule), "reason": exc.detail, "service": self._service})
        return Denied(grpc.StatusCode.UNAUTHENTICATED, f"client certificate refused: {exc}", refusal=str(exc.rule))

    def _admit(self, method: str, context: grpc.aio.ServicerContext, md: Sequence[tuple[str, Any]]) -> str | None:
        """Raise Denied unless this caller may call `method`; set the context variables. `md`: the call's
        invocation metadata."""
        remaining = context.time_remaining()
        inbound_deadline.set(None if remaining is None else monotonic() + remaining)
        if not self._require_tls:
            current_caller.set(None)
            return None
        identity = self._caller(context, md)
        current_caller.set(identity)
        if self._authz is None:
            return identity
        if identity is None:
            raise Denied(grpc.StatusCode.UNAUTHENTICATED, "no client certificate")
        if not self._authz.allows(identity, method):
            raise Denied(grpc.StatusCode.PERMISSION_DENIED,
                         f"{identity} is not allowed to call {method} on {self._authz.service}")
        if self.rate_limits is not None and (limited := self.rate_limits.admit(method, identity)) is not None:
            whose = f"{identity}'s own bucket" if limited.caller is not None else "the shared bucket"
            raise Denied(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"rate limited: {method} on {self._service} ({whose} is empty; next token in "
                         f"{limited.pushback_ms} ms)", trailers=((PUSHBACK_HEADER, str(limited.pushback_ms)),),
                         rate_limited=True)
        return identity

    def _caller(self, context: grpc.aio.ServicerContext, md: Sequence[tuple[str, Any]]) -> str | None:
        """The caller's identity once its connection's TLS version and certificate passed; Denied if not.
        A connection already verified under the current peer policy is not checked again."""
        sessions = self._sessions
        if sessions.policy is not self.peer_policy:
            sessions = self._sessions = VerifiedSessions(self.peer_policy)
        token = _session_token(md)
        key = None
        if token is not None:
            key = (context.peer(), token, tuple(context.peer_identities() or ()))
            if (identity := sessions.get(key)) is not None:
                return identity
        auth = context.auth_context()
        version = tls_version(auth)
        if version != REQUIRED_TLS:
            raise Denied(grpc.StatusCode.UNAUTHENTICATED,
                         f"mesh requires {REQUIRED_TLS}; connection negotiated {version or 'no TLS'}",
                         refusal=str(Rule.TLS_VERSION))
        try:
            identity = peer_identity(auth, sessions.policy)
        except PeerRefused as exc:
            raise self._refused(exc, context) from None
        if key is not None and identity is not None:
            sessions.add(key, identity)
        return identity

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        _note_lookup(handler_call_details)
        if handler is None:
            # grpc answers UNIMPLEMENTED itself, but then no observer would see the call: a scan or a
            # caller's typo would leave no metric, log line or span.
            return _unimplemented(self) if self.observers else None
        method = handler_call_details.method
        if isinstance(method, bytes):
            method = method.decode()
        return self.guarded(method, handler)

    def guarded(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler` behind this guard; made once per method and handler (checks and observers are read
        per call, so a changed authorizer or fault set applies to the next call all the same)."""
        key = (method, id(handler))
        hit = self._guarded.get(key)
        if hit is not None and hit[0] is handler:  # the same object, not one that reused a freed id
            return hit[1]
        wrapped = _wrap(handler, _Guard(self, method))
        if len(self._guarded) < 4096:  # bounded: a generic handler may make a new handler per call
            self._guarded[key] = (handler, wrapped)
        return wrapped


class _GuardedGenericHandler(grpc.GenericRpcHandler):  # type: ignore[misc]
    """A generic handler whose handlers answer behind the guard."""

    def __init__(self, inner: grpc.GenericRpcHandler, guard: MeshServerInterceptor) -> None:
        self._inner = inner
        self._guard = guard

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        _note_lookup(handler_call_details)
        return self._guard.guarded(handler_call_details.method, handler)


class _MethodTable(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Handlers of registered methods, by full method name, already guarded."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self.handlers.get(handler_call_details.method)
        if handler is not None:
            _note_lookup(handler_call_details)
        return handler


class _UnknownMethods(grpc.GenericRpcHandler):  # type: ignore[misc]
    """The last handler: a method nobody registered, answered UNIMPLEMENTED where observers see it."""

    def __init__(self, guard: MeshServerInterceptor) -> None:
        self._guard = guard

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return _unimplemented(self._guard) if self._guard.observers else None


class GuardedServer(_AioServer):  # type: ignore[misc]
    """A grpc.aio server whose every handler is registered behind `guard`: generated
    `add_*Servicer_to_server` functions, reflection and health register through these two methods.
    `guard_unknown_methods()` (before start) puts the guard in front of methods nobody registered.

    Methods registered by name are served from one table in front of the generic handlers (the same
    precedence grpc gives them), not registered with grpc core: grpc.aio keeps a pending request per
    registered method and waits on all of them for every call, so each one a server registers (health
    has two) costs every call of every method a little."""

    def __init__(self, guard: MeshServerInterceptor, *, options: Sequence[tuple[str, object]]) -> None:
        super().__init__(None, (), (), tuple(options), None, None)
        self.guard = guard
        self._table = _MethodTable()
        super().add_generic_rpc_handlers([self._table])

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        super().add_generic_rpc_handlers([_GuardedGenericHandler(h, self.guard) for h in generic_rpc_handlers])

    def add_registered_method_handlers(self, service_name: str,
                                       method_handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        for name, handler in method_handlers.items():
            method = f"/{service_name}/{name}"
            self._table.handlers[method] = self.guard.guarded(method, handler)

    def guard_unknown_methods(self) -> None:
        super().add_generic_rpc_handlers([_UnknownMethods(self.guard)])


class _Guard:
    """Per-method glue between a wrapped behaviour and the interceptor's checks and observers."""

    __slots__ = ("interceptor", "method")

    def __init__(self, interceptor: MeshServerInterceptor, method: str) -> None:
        self.interceptor = interceptor
        self.method = method

    async def enter(self, context: grpc.aio.ServicerContext) -> tuple[ServerCall, list[object]] | None:
        icp = self.interceptor
        denied: Denied | None = None
        caller: str | None = None
        md: Sequence[tuple[str, Any]] = ()
        if icp._require_tls or icp.observers:
            looked = _looked_up.get()
            md = looked[1] if looked is not None and looked[0] == self.method else context.invocation_metadata() or ()
        try:
            caller = icp._admit(self.method, context, md)
        except Denied as d:
            denied = d
            if d.rate_limited:  # an admitted caller: who it is belongs in the rate-limited metric
                caller = current_caller.get()
            if icp.on_denied is not None:
                try:
                    icp.on_denied(context, d)
                except Exception:
                    log.exception("on_denied hook failed for %s", self.method)
        if not icp.observers:
            if denied is not None:
                await context.abort(denied.code, denied.details, denied.trailers)
            # (no coroutine for `_delay` without faults: this is every call's path)
            if icp.faults is not None and (fault := await self._delay(caller)) is not None \
                    and fault.abort is not None:
                await context.abort(grpc.StatusCode[fault.abort], ABORT_DETAILS)
            return None
        seen = _metadata(md)
        attempt = next((int(v) for k, v in seen if k == ATTEMPT_HEADER and v.isdigit()), 1)
        call = ServerCall(icp._service, self.method, caller, seen, monotonic(), attempt,
                          denied.refusal if denied is not None else None,
                          rate_limited=denied is not None and denied.rate_limited)
        tokens = _start_all(icp.observers, call)
        if denied is not None:
            self.exit((call, tokens), context, None, denied.code.name)
            await context.abort(denied.code, denied.details, denied.trailers)
        try:
            fault = await self._delay(caller)
        except BaseException as exc:  # the deadline passed, or the caller cancelled, during the delay
            self.exit((call, tokens), context, exc)
            raise
        if fault is not None and fault.abort is not None:
            self.exit((call, tokens), context, None, fault.abort)
            await context.abort(grpc.StatusCode[fault.abort], ABORT_DETAILS)
        return call, tokens

    async def _delay(self, caller: str | None) -> Fault | None:
        """This admitted call's fault, its delay already waited (None: untouched)."""
        faults = self.interceptor.faults
        if faults is None or (fault := faults.decide(self.method, caller)) is None:
            return None
        if (on_fault := self.interceptor.on_fault) is not None:
            try:
                on_fault(self.method, fault)
            except Exception:
                log.exception("on_fault hook failed for %s", self.method)
        if fault.delay > 0:
            await faults.sleep(fault.delay)
        return fault

    def exit(self, state: tuple[ServerCall, list[object]] | None, context: grpc.aio.ServicerContext,
             error: BaseException | None, code: str | None = None) -> None:
        if state is None:
            return
        call, tokens = state
        _finish_all(self.interceptor.observers, tokens, call, code or _final_code(context, error), error)


def _start_all(observers: Sequence[ServerCallObserver], call: ServerCall) -> list[object]:
    """Every observer's `start`; one that raises is logged and skipped, never failing the call (as
    the client side's `policy.events.Listeners`)."""
    tokens: list[object] = []
    for o in observers:
        try:
            tokens.append(o.start(call))
        except Exception:
            log.exception("server observer %r failed to start %s", o, call.method)
            tokens.append(None)
    return tokens


def _finish_all(observers: Sequence[ServerCallObserver], tokens: Sequence[object], call: ServerCall, code: str,
                error: BaseException | None) -> None:
    # Reverse order, like a stack: the tracing observer (first) ends its span last, so the others
    # still see it as current (trace ids in log lines).
    for o, t in zip(reversed(observers), reversed(tokens), strict=True):
        try:
            o.finish(t, call, code, error)
        except Exception:
            log.exception("server observer %r failed to finish %s", o, call.method)


def _unimplemented(icp: MeshServerInterceptor) -> grpc.RpcMethodHandler:
    """The handler for a method this server does not have: UNIMPLEMENTED, as grpc answers, and seen
    by the observers under the one method label `unknown`. Streams of raw bytes fit any call shape."""

    async def behaviour(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        caller = None
        if icp._require_tls:
            with contextlib.suppress(PeerRefused):
                caller = peer_identity(context.auth_context(), icp.peer_policy)
        call = ServerCall(icp._service, UNKNOWN_METHOD, caller, _metadata(context.invocation_metadata() or ()),
                          monotonic(), 1)
        _finish_all(icp.observers, _start_all(icp.observers, call), call, "UNIMPLEMENTED", None)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")

    return grpc.stream_stream_rpc_method_handler(behaviour)


def _guarded(inner: Callable[..., Any], guard: _Guard) -> Callable[..., Any]:
    """A behaviour that returns once (unary response, or a stream written with context.write())."""

    async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> Any:
        state = await guard.enter(context)
        try:
            result = await inner(request, context)
        except BaseException as exc:
            guard.exit(state, context, exc)
            raise
        guard.exit(state, context, None)
        return result

    return behaviour


def _wrap(handler: grpc.RpcMethodHandler, guard: _Guard) -> grpc.RpcMethodHandler:
    if handler.unary_unary or handler.stream_unary:
        make = (grpc.unary_unary_rpc_method_handler if handler.unary_unary
                else grpc.stream_unary_rpc_method_handler)
        return make(_guarded(handler.unary_unary or handler.stream_unary, guard), handler.request_deserializer,
                    handler.response_serializer)

    inner_s = handler.unary_stream or handler.stream_stream
    make_s = (grpc.unary_stream_rpc_method_handler if handler.unary_stream
              else grpc.stream_stream_rpc_method_handler)
    # A streaming behaviour is either an async generator or a coroutine that uses context.write().
    if inspect.isasyncgenfunction(inner_s):
        async def gen(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            state = await guard.enter(context)
            try:
                async for item in inner_s(request, context):
                    yield item
            except BaseException as exc:
                guard.exit(state, context, exc)
                raise
            guard.exit(state, context, None)

        return make_s(gen, handler.request_deserializer, handler.response_serializer)

    return make_s(_guarded(inner_s, guard), handler.request_deserializer, handler.response_serializer)
