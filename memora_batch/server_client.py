"""Running API-format graphs on one or more ComfyUI servers over HTTP (standard library only).

POST /prompt submits a graph; GET /history/<id> is polled until the prompt has a status (ComfyUI keeps the outputs
and the error of every finished prompt there). With several servers, one worker per server takes the next job from
a shared queue, so jobs spread over them; a job whose server stops answering goes back to the queue for another
server and that server takes no more jobs. A job that ComfyUI itself rejects or that fails inside a node is a
result (recorded with its error), not a server failure."""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any, Callable, Optional

from .backend import RunResult


class ServerUnreachable(ConnectionError):
    """A ComfyUI server did not answer (refused, timed out, not ComfyUI)."""

    def __init__(self, url: str, reason: Any):
        self.url = url
        self.reason = reason
        super().__init__(f"ComfyUI server {url} is unreachable: {reason}. Start it (python main.py --listen ... "
                         f"--port ...) or check the URL; nothing was run.")


class ServerFailed(ConnectionError):
    """A server stopped answering while it held a job."""


class AllServersFailed(RuntimeError):
    pass


def normalize_url(url: str) -> str:
    """``host:port`` or ``http(s)://host[:port][/path]`` -> the base URL; ValueError naming what is wrong."""
    given = url
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    parsed = urllib.parse.urlparse(url)
    problem = None
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        problem = "it contains spaces or control characters"
    elif parsed.scheme not in ("http", "https"):
        problem = f"scheme {parsed.scheme!r} (expected http or https)"
    elif not parsed.hostname:
        problem = "no host name"
    elif parsed.query or parsed.fragment:
        problem = "a query or fragment"
    else:
        try:
            parsed.port  # ValueError for a port that is not a number in 0..65535
        except ValueError as e:
            problem = f"a bad port ({e})"
    if problem:
        raise ValueError(f"--server {given!r} is not a server URL: {problem}; expected a URL like "
                         f"http://127.0.0.1:8188")
    return url


class ComfyServer:
    def __init__(self, url: str, timeout: float = 10.0, poll_interval: float = 0.2):
        self.url = normalize_url(url)
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.client_id = uuid.uuid4().hex
        self._object_info: Optional[dict] = None
        self.current_prompt_id: Optional[str] = None

    # -- HTTP ----------------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: Optional[dict] = None) -> tuple[int, Any]:
        data = json.dumps(body).encode("utf-8") if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError, OSError) as e:
            raise ServerFailed(f"{self.url}{path}: {getattr(e, 'reason', e)}") from None
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            raise ServerFailed(f"{self.url}{path}: answered HTTP {status} with something that is not JSON "
                               f"(is this a ComfyUI server?)") from None

    def check(self) -> dict:
        """Reachable and a ComfyUI: returns its /object_info (node definitions), or raises ServerUnreachable."""
        try:
            status, info = self._request("GET", "/object_info")
        except ServerFailed as e:
            raise ServerUnreachable(self.url, str(e).split(": ", 1)[-1]) from None
        if status != 200 or not isinstance(info, dict) or not info:
            raise ServerUnreachable(self.url, f"GET /object_info answered HTTP {status}, not a list of nodes")
        self._object_info = info
        return info

    def object_info(self) -> dict:
        return self._object_info if self._object_info is not None else self.check()

    # -- prompts -------------------------------------------------------------------------------------------------
    def submit(self, prompt: dict, prompt_id: Optional[str] = None) -> tuple[Optional[str], Optional[dict]]:
        """(prompt_id, None) when queued; (None, error) when ComfyUI refused the graph (a job error)."""
        body = {"prompt": prompt, "client_id": self.client_id}
        if prompt_id:
            body["prompt_id"] = prompt_id
        status, data = self._request("POST", "/prompt", body)
        if status == 200 and isinstance(data, dict) and data.get("prompt_id"):
            return data["prompt_id"], None
        if status == 400 and isinstance(data, dict):
            err = data.get("error") or {}
            msg = err.get("message", str(err)) if isinstance(err, dict) else str(err)
            details = [f"node {nid} ({ne.get('class_type', '?')}): {e.get('message')}: {e.get('details', '')}"
                       for nid, ne in (data.get("node_errors") or {}).items() for e in ne.get("errors", [])]
            return None, {"exception_type": "GraphValidationError",
                          "exception_message": "; ".join([msg] + details), "node_errors": data.get("node_errors")}
        raise ServerFailed(f"{self.url}/prompt answered HTTP {status}: {str(data)[:200]}")

    def wait(self, prompt_id: str, timeout: Optional[float] = None) -> RunResult:
        start = time.monotonic()
        while True:
            status, data = self._request("GET", f"/history/{prompt_id}")
            entry = (data or {}).get(prompt_id) if status == 200 and isinstance(data, dict) else None
            st = (entry or {}).get("status") or {}
            if entry is not None and (st.get("completed") or st.get("status_str") == "error"
                                      or (not st and entry.get("outputs"))):
                messages = st.get("messages") or []
                error = None
                for msg in messages:
                    if isinstance(msg, (list, tuple)) and len(msg) == 2 and msg[0] in ("execution_error",
                                                                                        "execution_interrupted"):
                        error = {"event": msg[0], **(msg[1] or {})}
                success = st.get("status_str", "success") == "success" and error is None
                return RunResult(prompt_id, success, entry.get("outputs") or {}, error, self.url)
            if timeout is not None and time.monotonic() - start > timeout:
                self.interrupt(prompt_id)
                return RunResult(prompt_id, False, {}, {"exception_type": "TimeoutError",
                                                        "exception_message": f"no result after {timeout:.0f} s"},
                                 self.url)
            time.sleep(self.poll_interval)

    def interrupt(self, prompt_id: Optional[str] = None):
        try:
            self._request("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})
        except ServerFailed:
            pass

    def run(self, prompt: dict, timeout: Optional[float] = None) -> RunResult:
        prompt_id, error = self.submit(prompt)
        if error is not None:
            return RunResult("", False, {}, error, self.url)
        self.current_prompt_id = prompt_id
        try:
            return self.wait(prompt_id, timeout)
        finally:
            self.current_prompt_id = None

    def view_url(self, file: dict) -> str:
        q = urllib.parse.urlencode({k: file.get(k, "") for k in ("filename", "subfolder", "type")})
        return f"{self.url}/view?{q}"


def check_servers(urls: list[str], timeout: float = 10.0) -> list[ComfyServer]:
    """Every server reachable (else ServerUnreachable naming the first that is not), before anything runs."""
    servers = []
    for url in urls:
        server = ComfyServer(url, timeout=timeout)
        server.check()
        servers.append(server)
    return servers


def run_jobs(servers: list[ComfyServer], jobs: list[Any], prompt_of: Callable[[Any], dict],
             on_done: Callable[[Any, RunResult, float], None], job_timeout: Optional[float] = None,
             on_server_failed: Optional[Callable[[ComfyServer, Any, Exception], None]] = None,
             stop: Optional[threading.Event] = None) -> list[Any]:
    """Run ``jobs`` over ``servers`` (one in flight per server). ``on_done(job, result, seconds)`` is called from the
    worker threads, serialised by a lock. Returns the jobs left unrun (all servers failed, or ``stop`` was set)."""
    pending: "queue.Queue[Any]" = queue.Queue()
    for job in jobs:
        pending.put(job)
    lock = threading.Lock()
    alive = {s.url: True for s in servers}
    in_flight = [0]
    errors: list[BaseException] = []
    stop = stop or threading.Event()

    def worker(server: ComfyServer):
        while not stop.is_set():
            with lock:
                try:
                    job = pending.get_nowait()
                    in_flight[0] += 1
                except queue.Empty:
                    if in_flight[0] == 0:
                        return
                    job = None  # another server may still hand a job back
            if job is None:
                time.sleep(0.1)
                continue
            t0 = time.monotonic()
            try:
                result = server.run(prompt_of(job), timeout=job_timeout)
            except ServerFailed as e:
                with lock:
                    alive[server.url] = False
                    pending.put(job)  # another server takes it
                    in_flight[0] -= 1
                    if on_server_failed:
                        on_server_failed(server, job, e)
                return
            with lock:
                try:
                    if stop.is_set():  # interrupted or another worker failed: the caller may have let go of the
                        pending.put(job)  # results folder, so this job is left unrun, not recorded
                    else:
                        on_done(job, result, time.monotonic() - t0)
                finally:
                    in_flight[0] -= 1

    def guarded(server: ComfyServer):
        try:
            worker(server)
        except BaseException as e:  # e.g. OSError from on_done on a full disk: stop all, re-raised after joining
            with lock:
                errors.append(e)
            stop.set()

    threads = [threading.Thread(target=guarded, args=(s,), daemon=True, name=f"memora-batch {s.url}")
               for s in servers]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.2)
    except KeyboardInterrupt:
        stop.set()
        _interrupt_own(servers, alive)
        with lock:  # let a result being written finish
            pass
        raise
    if errors:
        raise errors[0]
    leftover = _drain(pending)
    if leftover and not any(alive.values()) and not stop.is_set():
        raise AllServersFailed(f"every server failed; {len(leftover)} job(s) not run (rerun to resume)")
    return leftover


def _interrupt_own(servers: list[ComfyServer], alive: dict) -> None:
    for s in servers:
        if alive[s.url] and s.current_prompt_id:
            s.interrupt(s.current_prompt_id)  # only our own prompt, never others' on a shared server


def _drain(pending: "queue.Queue[Any]") -> list[Any]:
    out = []
    while True:
        try:
            out.append(pending.get_nowait())
        except queue.Empty:
            return out
