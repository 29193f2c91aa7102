"""The network guard: connects, sends and name lookups made by guarded loads and model code.

Layers, so that no egress path goes unchecked:

* ``socket.socket.{connect,connect_ex,sendto,sendmsg}`` are set on the Python ``socket.socket``
  class: every socket.socket (one made before the guard started too) and everything built on them
  (``http.client``, ``urllib``, ``urllib3``/``requests``, asyncio's ``sock_connect`` and datagram
  transports) goes through them. They decide BEFORE the C method runs, which matters for a host
  name: ``connect(("name", 80))`` resolves the name inside C, with no audit event before the query.
* ``socket.getaddrinfo``, ``gethostbyname``, ``gethostbyname_ex``, ``gethostbyaddr`` and
  ``getnameinfo``: a lookup of a name no rule allows is refused without a query (the name itself
  can carry data out). An allowed lookup remembers the addresses the name resolved to, so that a
  rule written with a name (``api.example.com:443``) permits the connect to its address that follows.
* ``socket.create_connection`` decides on the (host, port) asked for, before resolving.
* asyncio resolves in an executor thread, where neither the load's chain nor model code's frames are
  visible: ``BaseEventLoop.getaddrinfo`` and ``getnameinfo`` decide in the caller's task first.
* the PEP 578 events ``socket.connect`` (also raised by ``connect_ex``), ``socket.sendto``,
  ``socket.sendmsg``, ``socket.getaddrinfo``, ``socket.gethostbyname`` (also ``_ex``),
  ``socket.gethostbyaddr`` and ``socket.getnameinfo`` back the patches for references bound before
  the guard started (``_socket.socket.connect(s, addr)``, a raw ``_socket.socket``). They are raised
  before any query, except that ``socket.connect`` comes after C resolved a host name.

Who is checked: a guarded load or model code (``provenance.acting_chain()``), or all code when an
allowlist sets ``network.process_wide: true``; never tmtguard's own work (``provenance.is_internal()``).
Application code costs one ``acting_chain()`` call per connect.
"""
from __future__ import annotations

import ipaddress
import operator
import os
import sys
import threading

import socket
import _socket

from .. import decision, provenance
from ..decision import NetworkViolation
from ..policy import suggestion
from . import _audit

_on = False
_wide = False
_policy = None

# The address (or host) object an interception has decided on this thread, while the original runs:
# the audit event that original raises is then not decided (and reported) a second time.
_tls = threading.local()

# Address -> names it was resolved from by an allowed lookup. Bounded: cleared when full.
_resolved: dict = {}
_resolved_lock = threading.Lock()
_RESOLVED_MAX = 4096

_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep

# Modules that carry a connection for someone else: the origin of an action is the code calling them.
_PLUMBING = frozenset(
    """socket ssl selectors asyncio http urllib urllib3 requests httpx httpcore h11 anyio aiohttp
    concurrent contextlib smtplib ftplib poplib imaplib xmlrpc""".split()
)


class _Originals:
    """What the patches replaced (captured at install) and call through to."""

    def __init__(self):
        self.saved: list = []  # (owner, attribute, value, was in owner.__dict__), for uninstall


_orig = _Originals()
_chain = provenance._CHAIN.get
_model_code = provenance._model_code  # never rebound by provenance


def _checked():
    """The chain an action is checked against, or None when it is not checked. The fast path first,
    as in _scope: application code pays a ContextVar read and two truth tests."""
    if not _chain() and not _model_code and not _wide:
        return None
    chain = provenance.acting_chain()
    if chain is None:
        if not _wide:
            return None
        chain = ()
    if not _on or provenance.is_internal():
        return None
    return chain


def _decided(key, fn, *args):
    outer = getattr(_tls, "decided", None)
    _tls.decided = key
    try:
        return fn(*args)
    finally:
        _tls.decided = outer


def _already_decided(key) -> bool:
    return getattr(_tls, "decided", None) is key


# --- the patches -------------------------------------------------------------------------------


def connect(self, address):
    chain = _checked()
    if chain is None:
        return _orig.connect(self, address)
    _check_peer(self, address, chain, "network.connect", "socket.socket.connect()", close=True)
    return _decided(address, _orig.connect, self, address)


def connect_ex(self, address):
    chain = _checked()
    if chain is None:
        return _orig.connect_ex(self, address)
    _check_peer(self, address, chain, "network.connect", "socket.socket.connect_ex()", close=True)
    return _decided(address, _orig.connect_ex, self, address)


def sendto(self, data, *args):
    chain = _checked()
    if chain is None or not args:
        return _orig.sendto(self, data, *args)
    address = args[-1]
    _check_peer(self, address, chain, "network.send", "socket.socket.sendto()")
    return _decided(address, _orig.sendto, self, data, *args)


def sendmsg(self, buffers, *args):
    chain = _checked()
    if chain is None or len(args) < 3 or args[2] is None:  # no address: a connected socket's peer
        return _orig.sendmsg(self, buffers, *args)
    address = args[2]
    _check_peer(self, address, chain, "network.send", "socket.socket.sendmsg()")
    return _decided(address, _orig.sendmsg, self, buffers, *args)


def create_connection(address, *args, **kwargs):
    chain = _checked()
    if chain is not None:
        # Decide on the name asked for; the lookup and connect inside are checked again (and pass).
        _check_peer(None, address, chain, "network.connect", "socket.create_connection()")
    return _orig.create_connection(address, *args, **kwargs)


def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
    chain = _checked()
    name = None if chain is None else _lookup_name(host, flags & socket.AI_NUMERICHOST)
    if name is None:
        return _orig.getaddrinfo(host, port, family, type, proto, flags)
    _check_lookup(name, port, chain, "socket.getaddrinfo()")
    infos = _decided(host, _orig.getaddrinfo, host, port, family, type, proto, flags)
    _learn(name, [info[4][0] for info in infos])
    return infos


def gethostbyname(hostname):
    chain = _checked()
    name = None if chain is None else _lookup_name(hostname)
    if name is None:
        return _orig.gethostbyname(hostname)
    _check_lookup(name, None, chain, "socket.gethostbyname()")
    address = _decided(hostname, _orig.gethostbyname, hostname)
    _learn(name, [address])
    return address


def gethostbyname_ex(hostname):
    chain = _checked()
    name = None if chain is None else _lookup_name(hostname)
    if name is None:
        return _orig.gethostbyname_ex(hostname)
    _check_lookup(name, None, chain, "socket.gethostbyname_ex()")
    result = _decided(hostname, _orig.gethostbyname_ex, hostname)
    _learn(name, result[2])
    return result


def gethostbyaddr(ip_address):
    chain = _checked()
    if chain is None:
        return _orig.gethostbyaddr(ip_address)
    _check_reverse(ip_address, chain, "socket.gethostbyaddr()")
    return _decided(ip_address, _orig.gethostbyaddr, ip_address)


def getnameinfo(sockaddr, flags):
    chain = _checked()
    if chain is None or flags & socket.NI_NUMERICHOST or not isinstance(sockaddr, tuple) or not sockaddr:
        return _orig.getnameinfo(sockaddr, flags)
    _check_reverse(sockaddr[0], chain, "socket.getnameinfo()")
    return _decided(sockaddr, _orig.getnameinfo, sockaddr, flags)


_SOCKET_METHODS = {"connect": connect, "connect_ex": connect_ex, "sendto": sendto, "sendmsg": sendmsg}
_MODULE_FUNCTIONS = {
    "create_connection": create_connection, "getaddrinfo": getaddrinfo, "gethostbyname": gethostbyname,
    "gethostbyname_ex": gethostbyname_ex, "gethostbyaddr": gethostbyaddr, "getnameinfo": getnameinfo,
}


# --- asyncio: resolution happens in an executor thread, so decide in the caller's task ----------


def _asyncio_patches(base_events):
    loop_getaddrinfo = base_events.BaseEventLoop.getaddrinfo
    loop_getnameinfo = base_events.BaseEventLoop.getnameinfo

    async def getaddrinfo(self, host, port, *, family=0, type=0, proto=0, flags=0):
        chain = _checked()
        name = None if chain is None else _lookup_name(host, flags & socket.AI_NUMERICHOST)
        if name is None:
            return await loop_getaddrinfo(self, host, port, family=family, type=type, proto=proto, flags=flags)
        _check_lookup(name, port, chain, "asyncio loop.getaddrinfo()")
        infos = await self.run_in_executor(None, _decided, host, _orig.getaddrinfo, host, port, family, type,
                                           proto, flags)
        _learn(name, [info[4][0] for info in infos])
        return infos

    async def getnameinfo(self, sockaddr, flags=0):
        chain = _checked()
        if chain is None or flags & socket.NI_NUMERICHOST or not isinstance(sockaddr, tuple) or not sockaddr:
            return await loop_getnameinfo(self, sockaddr, flags)
        _check_reverse(sockaddr[0], chain, "asyncio loop.getnameinfo()")
        return await self.run_in_executor(None, _decided, sockaddr, _orig.getnameinfo, sockaddr, flags)

    getaddrinfo.__doc__, getnameinfo.__doc__ = loop_getaddrinfo.__doc__, loop_getnameinfo.__doc__
    return {"getaddrinfo": getaddrinfo, "getnameinfo": getnameinfo}


_asyncio_hook_registered = False


def _patch_asyncio(base_events) -> None:
    cls = base_events.BaseEventLoop
    if not _on or getattr(cls.getaddrinfo, "_tmtguard_original", None) is not None:
        return
    for attr, replacement in _asyncio_patches(base_events).items():
        _replace(cls, attr, replacement)


# --- the audit events: references bound before the guard started ----------------------------------


def _on_connect_event(args):
    chain = _checked()
    if chain is None or _already_decided(args[1]):
        return
    _check_peer(args[0], args[1], chain, "network.connect", "socket.connect (audit event)", close=True)


def _on_sendto_event(args):
    chain = _checked()
    if chain is None or _already_decided(args[1]):
        return
    _check_peer(args[0], args[1], chain, "network.send", "socket.sendto (audit event)")


def _on_sendmsg_event(args):
    chain = _checked()
    if chain is None or args[1] is None or _already_decided(args[1]):
        return
    _check_peer(args[0], args[1], chain, "network.send", "socket.sendmsg (audit event)")


def _on_getaddrinfo_event(args):
    chain = _checked()
    if chain is None or _already_decided(args[0]):
        return
    name = _lookup_name(args[0])
    if name is not None:
        _check_lookup(name, args[1], chain, "socket.getaddrinfo (audit event)")


def _on_gethostbyname_event(args):
    chain = _checked()
    if chain is None or _already_decided(args[0]):
        return
    name = _lookup_name(args[0])
    if name is not None:
        _check_lookup(name, None, chain, "socket.gethostbyname (audit event)")


def _on_gethostbyaddr_event(args):
    chain = _checked()
    if chain is None or _already_decided(args[0]):
        return
    _check_reverse(args[0], chain, "socket.gethostbyaddr (audit event)")


def _on_getnameinfo_event(args):
    chain = _checked()
    sockaddr = args[0]
    if chain is None or _already_decided(sockaddr) or args[1] & socket.NI_NUMERICHOST:
        return
    if isinstance(sockaddr, tuple) and sockaddr:
        _check_reverse(sockaddr[0], chain, "socket.getnameinfo (audit event)")


_EVENTS = {
    "socket.connect": _on_connect_event, "socket.sendto": _on_sendto_event, "socket.sendmsg": _on_sendmsg_event,
    "socket.getaddrinfo": _on_getaddrinfo_event, "socket.gethostbyname": _on_gethostbyname_event,
    "socket.gethostbyaddr": _on_gethostbyaddr_event, "socket.getnameinfo": _on_getnameinfo_event,
}


# --- deciding (only reached for guarded loads, model code, or process-wide) ----------------------


def _check_peer(sock, address, chain, action, call, *, close=False) -> None:
    """Decide a connect or send to ``address``; a refused connect closes ``sock`` (no leaked fd)."""
    try:
        _decide_peer(sock, address, chain, action, call)
    except NetworkViolation:
        if close and sock is not None:
            try:
                sock.close()
            except Exception:
                pass
        raise


def _decide_peer(sock, address, chain, action, call) -> None:
    try:
        family = getattr(sock, "family", None)
        host, port, target = _peer(family, address)
        if host is not None and _peer_allowed(host, port, chain):
            return
        if host is None:
            what, entry = f"address {address!r} (family {_family_name(family)}, which no network rule can name)", None
        elif port is None:
            what, entry = f"unix socket {host!r}", target
        else:
            what, entry = f'host "{host}" port {port}', target
        _refuse(action, target, entry, chain, call, what, {"host": host, "port": port})
    except decision.Violation:
        raise
    except Exception as exc:  # fail closed in enforce, never break the application in audit
        decision.failed(action, repr(address), exc, violation=NetworkViolation)


def _check_lookup(name: str, port, chain, call) -> None:
    """Decide a lookup of ``name`` before any query is made."""
    try:
        number = _port_number(port)
        policy = _policy
        if number is None:
            if policy.network_name_allowed(name, chain) is not None:
                return
            entry, what = f"{name}:*", f'name "{name}"'
        else:
            if policy.network_allowed(name, number, chain) is not None:
                return
            entry, what = _hostport(name, number), f'name "{name}" (for port {number})'
        _refuse("network.resolve", name, entry, chain, call, what, {"host": name, "port": number})
    except decision.Violation:
        raise
    except Exception as exc:
        decision.failed("network.resolve", repr(name), exc, violation=NetworkViolation)


def _check_reverse(address, chain, call) -> None:
    """Decide a reverse lookup (a PTR query for ``address``; the address itself can carry data)."""
    try:
        host = _text(address)
        if _ip_text(host) is None:  # gethostbyaddr("name") looks the name up first
            name = _lookup_name(host)
            if name is not None:
                _check_lookup(name, None, chain, call)
            return
        if _policy.network_name_allowed(host, chain) is not None:
            return
        entry = f"[{host}]:*" if ":" in host else f"{host}:*"
        _refuse("network.resolve", host, entry, chain, call, f'the name of address "{host}"', {"host": host, "port": None})
    except decision.Violation:
        raise
    except Exception as exc:
        decision.failed("network.resolve", repr(address), exc, violation=NetworkViolation)


def _peer_allowed(host: str, port, chain) -> bool:
    policy = _policy
    if policy.network_allowed(host, port, chain) is not None:
        return True
    ip = _ip_text(host)
    if ip is not None and port is not None:
        for name in tuple(_resolved.get(ip, ())):
            if policy.network_allowed(name, port, chain) is not None:
                return True
    return False


def _refuse(action, target, entry, chain, call, what, detail) -> None:
    policy = _policy
    frame = chain[-1] if chain else None
    origin, via = _origin()
    if not chain:
        who = "application code (network.process_wide is on)"
    elif provenance.peek():
        who = "a guarded load"
    else:
        who = "model code"
    rules = policy.network_rules(chain)
    allowed = ", ".join(f'"{rule.text}" ({src})' for rule, src in rules[:8]) or "nothing"
    if len(rules) > 8:
        allowed += f" and {len(rules) - 8} more"
    through = f" (through {via})" if via else ""
    rule = f"{who} tried to use {call} with {what}{through}; no network rule allows it (allowed: {allowed})"
    detail = dict(detail, call=call)
    if via:
        detail["via"] = via
    decision.refuse(
        action, target, rule, chain=chain,
        suggestion=suggestion("network", entry, frame, digest=frame.event_digest() if frame is not None else None)
        if entry else None,
        violation=NetworkViolation, detail=detail, origin=origin,
    )


def _origin():
    """(origin dict, "module.function()" the origin called into) for a refusal. The origin is the
    model code on the stack if any, else the innermost frame that is neither tmtguard nor network
    plumbing (socket, http.client, urllib, requests, asyncio...)."""
    found = provenance.model_code_frame(1)
    via = None
    if found is not None:
        f = found[1]
    else:
        f = sys._getframe(1)
        while f is not None:
            filename = f.f_code.co_filename
            module = f.f_globals.get("__name__") or ""
            if not filename.startswith(_OWN_DIR) and not filename.startswith("<frozen"):
                if module.partition(".")[0] not in _PLUMBING:
                    break
                via = f"{module}.{getattr(f.f_code, 'co_qualname', f.f_code.co_name)}()"
            f = f.f_back
        if f is None:
            return provenance.origin(2), via
    filename = f.f_code.co_filename
    return {
        "module": f.f_globals.get("__name__"),
        "file": filename,
        "line": f.f_lineno,
        "function": f.f_code.co_name,
        "distribution": provenance.distribution_of(filename),
    }, via


# --- addresses -------------------------------------------------------------------------------------


def _text(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("ascii", "backslashreplace")
    raise TypeError(f"a host is str or bytes, not {type(value).__name__}")


def _peer(family, address):
    """(host, port, target) for a socket address; (None, None, target) when no rule can name it.
    A unix socket has port None and a host that is its path (``@name`` for an abstract one)."""
    if family == getattr(socket, "AF_UNIX", object()) or (family is None and isinstance(address, (str, bytes))):
        path = os.fsdecode(bytes(address) if isinstance(address, bytearray) else address)
        if path.startswith("\0"):
            path = "@" + path[1:]
        return path, None, "unix:" + path
    if family in (socket.AF_INET, socket.AF_INET6, None) and isinstance(address, tuple) and len(address) >= 2:
        host = _text(address[0])
        port = _port_number(address[1])
        if host == "":  # what C connects to for an empty host
            host = "::" if family == socket.AF_INET6 else "0.0.0.0"
        elif host == "<broadcast>":
            host = "255.255.255.255"
        return host, port, _hostport(host, port)
    return None, None, f"{_family_name(family)}:{address!r}"


def _family_name(family) -> str:
    try:
        return socket.AddressFamily(family).name
    except (ValueError, TypeError):
        return str(family)


def _hostport(host: str, port) -> str:
    p = "*" if port is None else port
    return f"[{host}]:{p}" if ":" in host else f"{host}:{p}"


def _port_number(port):
    if port is None:
        return None
    if isinstance(port, (str, bytes)):
        text = _text(port)
        if text.isdigit():
            return int(text)
        try:
            return _socket.getservbyname(text)  # /etc/services: a local file, no query
        except OSError:
            return None
    return operator.index(port)


def _ip_text(host: str):
    """The address in canonical form (an IPv4-mapped IPv6 address as IPv4), or None for a name."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped if mapped is not None else ip)


def _lookup_name(host, numeric_only=0):
    """The name a lookup would query, or None when it queries nothing (no host, an address)."""
    if host is None or numeric_only:
        return None
    name = _text(host).strip()
    if not name or _ip_text(name) is not None:
        return None
    return name


def _learn(name: str, addresses) -> None:
    key = name.lower().rstrip(".")
    with _resolved_lock:
        for address in addresses:
            ip = _ip_text(address) if isinstance(address, str) else None
            if ip is None:
                continue
            names = _resolved.get(ip)
            if names is None:
                if len(_resolved) >= _RESOLVED_MAX:
                    _resolved.clear()
                _resolved[ip] = {key}
            else:
                names.add(key)


# --- install / uninstall -----------------------------------------------------------------------


def _replace(owner, attr: str, replacement) -> None:
    current = getattr(owner, attr)
    if getattr(current, "_tmtguard_original", None) is not None:
        return
    replacement._tmtguard_original = current
    replacement.__doc__ = getattr(current, "__doc__", None)
    _orig.saved.append((owner, attr, current, attr in vars(owner)))
    setattr(owner, attr, replacement)


_Gated = getattr(_audit._fast, "Gated", None)


def _gated(original, replacement):
    """With the C extension, the patch put in place is a Gated call: the original C method when the
    network guard would not act (the same test _checked() makes first, in C), the replacement
    otherwise. Application code's connect then costs a C call, not a Python frame."""
    if _Gated is None:
        return replacement
    gated = _Gated(original, replacement, _audit.NET_WIDE)
    gated.__wrapped__ = replacement
    for name in ("__name__", "__qualname__", "__module__"):
        setattr(gated, name, getattr(replacement, name))
    return gated


def install(policy) -> None:
    global _on, _wide, _policy, _asyncio_hook_registered
    _policy = policy
    _wide = policy.network_process_wide
    _audit.set_wide(_audit.NET_WIDE, _wide)
    if not _on:
        for attr, replacement in _SOCKET_METHODS.items():
            setattr(_orig, attr, getattr(socket.socket, attr))
            _replace(socket.socket, attr, _gated(getattr(_orig, attr), replacement))
        for attr, replacement in _MODULE_FUNCTIONS.items():
            setattr(_orig, attr, getattr(socket, attr))
            _replace(socket, attr, _gated(getattr(_orig, attr), replacement))
        for event, handler in _EVENTS.items():
            _audit.register(event, handler, scope=_audit.NET_WIDE)
    _on = True
    # asyncio is patched when it is imported (tmtguard does not import it)
    if not _asyncio_hook_registered:
        import wrapt

        wrapt.register_post_import_hook(_patch_asyncio, "asyncio.base_events")
        _asyncio_hook_registered = True
    elif "asyncio.base_events" in sys.modules:
        _patch_asyncio(sys.modules["asyncio.base_events"])


def uninstall() -> None:
    global _on
    _on = False
    for event in _EVENTS:
        _audit.unregister(event)
    while _orig.saved:
        owner, attr, original, owned = _orig.saved.pop()
        if owned:
            setattr(owner, attr, original)
        else:
            delattr(owner, attr)
    _resolved.clear()
