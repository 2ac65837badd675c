"""What `get_channel` hands out: a grpc.aio.Channel whose unary-unary calls enter the policy stack
directly, without grpc.aio's interceptor machinery.

grpc.aio runs every intercepted call in an asyncio Task of its own and wraps the result in a second
call object. On this 2-core machine that costs about +45 µs of client CPU per call, as much as the
whole policy stack (docs/benchmarks.md). So, as grpc-java's `ClientInterceptors.intercept(channel,
...)` does, the binding lives in the channel: `unary_unary(...)` returns a multicallable that hands
the call to the target's `Invoker.unary` (client/invoke.py, the same code the interceptor runs) and a
`MeshUnaryUnaryCall` that runs it

- in the awaiting task itself, when the caller awaits the call at once (`await stub.M(req)`): no
  Task, no second call object on the wire path;
- in a Task of its own otherwise, started on the next loop iteration, so a call that is made and
  awaited later (or never) still starts at once, as grpc.aio's calls do.

Everything else goes to the front channel and its interceptors, which hand it to the same Invoker:
the three streaming arities (the stack admits them and holds their slot until they end), and unary
methods that are not protobuf (they need grpc's continuation). A unary protobuf method called with the
caller's own (de)serializers (raw bytes) is sent with them; a stream of one is refused them, since its
interceptor is never given them.

One difference from grpc.aio: the stack runs in the context current where the call is *awaited*
(for `await stub.M(req)`, where it is made). A call made inside a span and awaited after leaving it
in the same step gets the outer span as its parent; grpc.aio would use the inner one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Generator
from types import TracebackType
from typing import Any, Protocol

import grpc

from aivo_mesh.client.invoke import Invoker, method_info
from aivo_mesh.client.methods import MethodInfo
from aivo_mesh.errors import MeshError


class Connectivity(Protocol):
    """The folded connectivity of a target's endpoint channels (client.target.Target has it)."""

    def connectivity(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity: ...

    async def wait_for_connectivity_change(self, last: grpc.ChannelConnectivity) -> None: ...

    async def wait_ready(self, timeout: float | None) -> None: ...

_NEW, _INLINE, _TASK, _DONE = range(4)
_CANCELLED_DETAILS = "Locally cancelled by application!"  # grpc.aio's wording


class Starter:
    """Starts the calls that nobody awaited in the step that made them, in a Task each: one loop
    callback per step for all the calls of that step, rather than one per call (most calls are
    awaited at once, and the callback then finds nothing to do). One per channel, as a channel
    belongs to one event loop."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending: list[MeshUnaryUnaryCall] = []

    def add(self, call: MeshUnaryUnaryCall) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._start)
        self._pending.append(call)

    def _start(self) -> None:
        pending, self._pending = self._pending, []
        for call in pending:
            if call._state == _NEW:
                call._start_detached()


class MeshUnaryUnaryCall(grpc.aio.UnaryUnaryCall):  # type: ignore[misc]
    """A unary call through the policy stack, with grpc.aio's `UnaryUnaryCall` interface.

    Metadata, code and details come from the attempt that answered (or from the call's error), so
    the caller sees what it would see on a plain channel. `cancel()` stops the stack at once, retries
    and backoff included; awaiting a cancelled call raises `asyncio.CancelledError`, as in grpc.aio.
    `time_remaining()` reports the caller's `timeout=` only (the route's and an inherited deadline
    apply inside the stack). `initial_metadata()` and `wait_for_connection()` return once the call
    has finished, as for any intercepted grpc.aio call.
    """

    # Defaults at class level: a call sets only what it uses (most calls are awaited at once, and
    # succeed), so making one costs three attribute stores, not twelve.
    _owner: asyncio.Task[Any] | None = None
    _task: asyncio.Task[Any] | None = None
    _value: Any = None
    _answered: Any = None
    _error: BaseException | None = None
    _waiter: asyncio.Future[None] | None = None
    _callbacks: list[Callable[[Any], None]] | None = None
    _deadline: float | None = None
    _cancel_requested = False

    def __init__(self, invocation: Coroutine[Any, Any, tuple[Any, Any]], timeout: float | None,
                 starter: Starter) -> None:
        self._invocation = invocation
        self._state = _NEW
        if timeout is not None:
            self._deadline = time.monotonic() + timeout
        starter.add(self)

    # -- running ---------------------------------------------------------------------------------
    def _start_detached(self) -> None:
        """Nobody awaited the call in the step that made it: run it in a Task of its own."""
        if self._state == _NEW:
            self._state = _TASK
            self._task = asyncio.get_running_loop().create_task(self._run())
            self._task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if self._state != _DONE:  # cancelled before its first step: `_run` never ran
            self._invocation.close()
            self._finish(asyncio.CancelledError())
        if not task.cancelled():
            task.exception()  # the caller reads it from the call: no "never retrieved" warning

    async def _run(self) -> Any:
        """The call in a Task of its own (`__await__` runs it in the awaiting task instead)."""
        try:
            self._value, self._answered = await self._invocation
        except BaseException as exc:
            self._failed(exc)
            raise
        self._finish(None)
        return self._value

    def _failed(self, exc: BaseException) -> None:
        if isinstance(exc, asyncio.CancelledError) and self._cancel_requested and self._owner is not None:
            self._owner.uncancel()  # our cancel(), not the owner's own: leave its count as it was
        self._finish(exc)

    def _finish(self, error: BaseException | None) -> None:
        self._state = _DONE
        self._error = error
        self._owner = None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        if self._callbacks:
            callbacks, self._callbacks = self._callbacks, None
            for cb in callbacks:
                self._callback(cb)

    def _callback(self, cb: Callable[[Any], None]) -> None:
        """A failing callback is reported to the loop, as asyncio does for its own callbacks; it must
        not replace the call's outcome or skip the other callbacks."""
        try:
            cb(self)
        except Exception as exc:
            asyncio.get_running_loop().call_exception_handler(
                {"message": f"exception in a done callback of {self!r}", "exception": exc})

    def __await__(self) -> Generator[Any, None, Any]:
        if self._state == _NEW:  # the usual `await stub.M(req)`: run in the awaiting task (as `_run`, inline)
            self._state = _INLINE
            self._owner = asyncio.current_task()
            try:
                self._value, self._answered = yield from self._invocation.__await__()
            except BaseException as exc:
                self._failed(exc)
                raise
            self._finish(None)
            return self._value
        if self._state == _TASK:  # awaited directly, as grpc.aio does: cancelling the awaiter cancels the call
            assert self._task is not None
            return (yield from self._task.__await__())
        if self._state != _DONE:  # a second awaiter while another task runs it
            yield from self._finished().__await__()
        return self._outcome()

    def _outcome(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value

    async def _finished(self) -> None:
        if self._state == _NEW:
            self._start_detached()
        if self._state != _DONE:
            if self._waiter is None:
                self._waiter = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._waiter)  # one waiter cancelled must not cancel the others

    # -- grpc.aio.Call ---------------------------------------------------------------------------
    def cancel(self) -> bool:
        if self._state == _DONE or self._cancel_requested:  # a second cancel must not cancel the owner twice
            return False
        self._cancel_requested = True
        if self._state == _NEW:
            self._invocation.close()
            self._finish(asyncio.CancelledError())
        elif self._state == _INLINE:
            if self._owner is None:  # awaited outside any Task: nothing we can interrupt
                self._cancel_requested = False
                return False
            self._owner.cancel()
        else:
            assert self._task is not None
            self._task.cancel()
        return True

    def cancelled(self) -> bool:
        if self._state != _DONE:
            return False
        if isinstance(self._error, asyncio.CancelledError):
            return True
        return isinstance(self._error, grpc.aio.AioRpcError) and self._error.code() == grpc.StatusCode.CANCELLED

    def done(self) -> bool:
        return self._state == _DONE

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        if self._state == _DONE:
            self._callback(callback)
        elif self._callbacks is None:
            self._callbacks = [callback]
        else:
            self._callbacks.append(callback)

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)

    async def initial_metadata(self) -> Any:
        return await self._metadata("initial_metadata")

    async def trailing_metadata(self) -> Any:
        return await self._metadata("trailing_metadata")

    async def _metadata(self, which: str) -> Any:
        """From the call's error, or the attempt that answered; None once cancelled."""
        await self._finished()
        if isinstance(self._error, grpc.aio.AioRpcError):
            return getattr(self._error, which)()
        if self._error is not None:
            return None
        return await getattr(self._answered, which)() if self._answered is not None else grpc.aio.Metadata()

    async def code(self) -> grpc.StatusCode:
        await self._finished()
        if isinstance(self._error, grpc.aio.AioRpcError):
            return self._error.code()
        if self._error is not None:
            return grpc.StatusCode.CANCELLED if isinstance(self._error, asyncio.CancelledError) \
                else grpc.StatusCode.UNKNOWN
        return grpc.StatusCode.OK

    async def details(self) -> str:
        await self._finished()
        if isinstance(self._error, grpc.aio.AioRpcError):
            return str(self._error.details() or "")
        if isinstance(self._error, asyncio.CancelledError):
            return _CANCELLED_DETAILS
        if self._error is not None:
            return f"{type(self._error).__name__}: {self._error}"
        return str(await self._answered.details() or "") if self._answered is not None else ""

    async def debug_error_string(self) -> str | None:
        await self._finished()
        if isinstance(self._error, grpc.aio.AioRpcError):
            return str(self._error.debug_error_string())
        return ""

    async def wait_for_connection(self) -> None:
        await self._finished()
        self._outcome()  # raises the call's error, as grpc.aio does


class _UnaryUnaryMultiCallable(grpc.aio.UnaryUnaryMultiCallable):  # type: ignore[misc]
    __slots__ = ("_codec", "_invoker", "_method", "_starter")

    def __init__(self, invoker: Invoker, method: str, codec: MethodInfo | None, starter: Starter) -> None:
        self._invoker = invoker
        self._method = method
        self._codec = codec  # the caller's own (de)serializers, if not the message classes'
        self._starter = starter

    def __call__(self, request: Any, *, timeout: float | None = None, metadata: Any = None,
                 credentials: grpc.CallCredentials | None = None, wait_for_ready: bool | None = None,
                 compression: grpc.Compression | None = None) -> MeshUnaryUnaryCall:
        return MeshUnaryUnaryCall(self._invoker.unary(self._method, request, timeout, metadata, credentials,
                                                      wait_for_ready, compression, codec=self._codec), timeout,
                                  self._starter)


def _own_codec_only(method: str | bytes, request_serializer: Callable[..., Any] | None,
                    response_deserializer: Callable[..., Any] | None) -> None:
    """Streams of a protobuf method are sent with its message classes (the interceptors that run them
    are not given the caller's serializers): other (de)serializers are refused here rather than
    silently replaced, which would send the server something else than the caller meant."""
    path = method.decode() if isinstance(method, bytes) else method
    info = method_info(path)
    if info is not None and info.with_codec(request_serializer, response_deserializer) is not info:
        raise MeshError(f"{path}: a stream of a protobuf method is sent with its own message classes; "
                        "MeshChannel does not take other serializers for streams")


class MeshChannel(grpc.aio.Channel):  # type: ignore[misc]
    """The channel `MeshClient.get_channel` returns (see the module docstring).

    It is pooled and shared: `close()` and leaving `async with` leave it open (`MeshClient.close`
    closes it). Connectivity is that of the target's endpoint channels, folded as grpc folds
    subchannels: `channel_ready()` returns once any endpoint is READY.
    """

    def __init__(self, invoker: Invoker, front: grpc.aio.Channel, target: Connectivity) -> None:
        self._target = target
        self._front = front
        self._invoker = invoker
        self._starter = Starter()

    def unary_unary(self, method: str, request_serializer: Callable[..., Any] | None = None,
                    response_deserializer: Callable[..., Any] | None = None,
                    _registered_method: bool | None = False) -> Any:
        path = method.decode() if isinstance(method, bytes) else method
        info = method_info(path)
        if info is None:  # not protobuf: the interceptor, with grpc's continuation
            return self._front.unary_unary(method, request_serializer, response_deserializer, _registered_method)
        # A caller's own (de)serializers (raw bytes) are used as given, as on a plain channel.
        codec = info.with_codec(request_serializer, response_deserializer)
        return _UnaryUnaryMultiCallable(self._invoker, path, None if codec is info else codec, self._starter)

    def unary_stream(self, method: str, request_serializer: Callable[..., Any] | None = None,
                     response_deserializer: Callable[..., Any] | None = None,
                     _registered_method: bool | None = False) -> Any:
        _own_codec_only(method, request_serializer, response_deserializer)
        return self._front.unary_stream(method, request_serializer, response_deserializer, _registered_method)

    def stream_unary(self, method: str, request_serializer: Callable[..., Any] | None = None,
                     response_deserializer: Callable[..., Any] | None = None,
                     _registered_method: bool | None = False) -> Any:
        _own_codec_only(method, request_serializer, response_deserializer)
        return self._front.stream_unary(method, request_serializer, response_deserializer, _registered_method)

    def stream_stream(self, method: str, request_serializer: Callable[..., Any] | None = None,
                      response_deserializer: Callable[..., Any] | None = None,
                      _registered_method: bool | None = False) -> Any:
        _own_codec_only(method, request_serializer, response_deserializer)
        return self._front.stream_stream(method, request_serializer, response_deserializer, _registered_method)

    async def __aenter__(self) -> MeshChannel:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        return None

    async def close(self, grace: float | None = None) -> None:
        """A no-op: the channel is pooled and shared by every stub of this target."""
        return None

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._target.connectivity(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._target.wait_for_connectivity_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._target.wait_ready(None)
