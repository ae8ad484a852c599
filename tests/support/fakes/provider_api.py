"""A local HTTP server (127.0.0.1, free port) that answers like the Telegram Bot API and
Twilio's Messages resource, records what they accepted, and can be told to fail.

    api = ProviderApi().start()
    settings: ALERTS_TELEGRAM_API_BASE=api.base_url, ALERTS_TWILIO_API_BASE=api.twilio_api_base
    api.telegram_error(*BLOCKED, chat_id="42")          # 403 for that chat, until reset
    api.telegram_error(429, "Too Many Requests: retry after 7", retry_after=7, times=1)
    api.telegram_error(*UPGRADED, chat_id="-42", parameters={"migrate_to_chat_id": -1001})
    api.telegram_raw(502, "<html>Bad Gateway</html>")    # a proxy page, not JSON
    api.twilio_error(400, 21211, INVALID_TO, to="+100")
    api.delay(2.0, service="telegram", times=1)          # longer than the client timeout
    api.telegram_messages / api.sms_messages             # what was accepted
    api.webhooks                                         # every setWebhook call's parameters

Like Telegram, sendMessage with parse_mode=HTML parses the text and answers 400 "can't
parse entities" for unsupported tags or unescaped '<' / '&', and 400 "message is too
long" past 4096 UTF-16 code units after entity parsing. Real Telegram tolerates a bare
'&'; the Bot API documentation says it must be escaped, and so does this fake, to catch
renderers that forget.
"""
from __future__ import annotations

import base64
import itertools
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

TELEGRAM_MAX_LENGTH = 4096
TWILIO_MAX_BODY = 1600

BLOCKED = (403, "Forbidden: bot was blocked by the user")
DEACTIVATED = (403, "Forbidden: user is deactivated")
KICKED = (403, "Forbidden: bot was kicked from the group chat")
CHAT_NOT_FOUND = (400, "Bad Request: chat not found")
UPGRADED = (400, "Bad Request: group chat was upgraded to a supergroup chat")  # with migrate_to_chat_id
UNAUTHORIZED = (401, "Unauthorized")
BAD_ENTITIES = (400, "Bad Request: can't parse entities: Unsupported start tag \"x\" at byte offset 0")
INVALID_TO = "The 'To' number is not a valid phone number."


# --- Telegram's HTML parse mode ----------------------------------------------------------

class EntityError(ValueError):
    """Text Telegram would refuse with "Bad Request: can't parse entities: ..."."""


SUPPORTED_TAGS = {"b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "span", "tg-spoiler",
                  "a", "code", "pre", "blockquote", "tg-emoji"}
NAMED_ENTITIES = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}
_ENTITY = re.compile(r"&(?:#([0-9]{1,8})|#[xX]([0-9a-fA-F]{1,8})|([A-Za-z][A-Za-z0-9]*));")
_TAG = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9-]*)((?:\s+[A-Za-z-]+(?:\s*=\s*(?:\"[^\"]*\"|'[^']*'|[^\s\"'>]+))?)*)\s*>")
_ATTR = re.compile(r"([A-Za-z-]+)(?:\s*=\s*(?:\"([^\"]*)\"|'([^']*)'|([^\s\"'>]+)))?")


def _offset(text: str, index: int) -> int:
    return len(text[:index].encode("utf-8"))  # Telegram reports byte offsets


def parse_html(text: str) -> str:
    """The plain text Telegram would show for ``text`` in HTML parse mode.
    Raises EntityError with Telegram's wording when it would refuse the text."""
    out: list[str] = []
    open_tags: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "&":
            match = _ENTITY.match(text, i)
            if match is None or (match.group(3) and match.group(3) not in NAMED_ENTITIES):
                raise EntityError(f"Unsupported HTML entity at byte offset {_offset(text, i)}")
            if match.group(3):
                out.append(NAMED_ENTITIES[match.group(3)])
            else:
                code = int(match.group(1)) if match.group(1) else int(match.group(2), 16)
                if not 0 < code <= 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                    raise EntityError(f"Invalid character reference at byte offset {_offset(text, i)}")
                out.append(chr(code))
            i = match.end()
        elif ch == "<":
            match = _TAG.match(text, i)
            name = match.group(2).lower() if match else ""
            if match is None or name not in SUPPORTED_TAGS:
                kind = "end" if text.startswith("</", i) else "start"
                raise EntityError(f'Unsupported {kind} tag "{name}" at byte offset {_offset(text, i)}')
            if match.group(1):
                if not open_tags:
                    raise EntityError(f"Unexpected end tag at byte offset {_offset(text, i)}")
                if open_tags[-1] != name:
                    raise EntityError(f'Unmatched end tag at byte offset {_offset(text, i)}, '
                                      f'expected "</{open_tags[-1]}>", found "</{name}>"')
                open_tags.pop()
            else:
                attrs = {m.group(1).lower(): next((g for g in m.groups()[1:] if g is not None), "")
                         for m in _ATTR.finditer(match.group(3))}
                if name == "span" and attrs.get("class") != "tg-spoiler":
                    raise EntityError(f'Tag "span" must have class "tg-spoiler" at byte offset {_offset(text, i)}')
                open_tags.append(name)
            i = match.end()
        else:
            out.append(ch)
            i += 1
    if open_tags:
        raise EntityError(f'Can\'t find end tag corresponding to start tag "{open_tags[-1]}"')
    return "".join(out)


def utf16_length(text: str) -> int:
    """Length as Telegram counts it: an emoji outside the BMP counts 2."""
    return len(text.encode("utf-16-le")) // 2


# --- scripting -----------------------------------------------------------------------------

@dataclass
class Scripted:
    service: str  # "telegram" | "twilio"
    status: int | None = None  # None: answer normally (after the delay)
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    match: str | None = None  # chat_id / To number; None ⇒ every request
    times: int | None = None  # None ⇒ until reset
    delay: float = 0.0


@dataclass
class TelegramMessage:
    chat_id: str
    text: str
    parse_mode: str | None
    link_preview_options: dict | None
    disable_web_page_preview: bool | None
    message_id: int

    @property
    def preview_disabled(self) -> bool:
        return bool((self.link_preview_options or {}).get("is_disabled") or self.disable_web_page_preview)


@dataclass
class SmsMessage:
    sid: str
    account_sid: str
    to: str
    from_: str
    body: str


class ProviderApi:
    def __init__(self, *, bot_token: str = "123:SECRET", twilio_sid: str = "AC" + "0" * 32,
                 twilio_token: str = "twilio-SECRET"):
        self.bot_token = bot_token
        self.twilio_sid = twilio_sid
        self.twilio_token = twilio_token
        self._lock = threading.Lock()
        # Each reset starts a new generation and wakes the requests still waiting out a
        # scripted delay; they then answer 503 and record nothing, so a slow request of
        # one test never shows up in the next.
        self._generation = 0
        self._wake = threading.Event()
        self._scripts: list[Scripted] = []
        self.telegram_messages: list[TelegramMessage] = []
        self.sms_messages: list[SmsMessage] = []
        self.webhooks: list[dict] = []  # setWebhook parameters, in order
        self.requests: list[tuple[str, int]] = []  # (service, status answered), every request
        self.telegram_requests: list[tuple[str, float]] = []  # (chat_id, time.time() on arrival), every request
        self._message_ids = itertools.count(1)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._httpd.api = self
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> "ProviderApi":
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._wake.set()  # cuts scripted delays short
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "ProviderApi":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def telegram_api_base(self) -> str:
        return self.base_url

    @property
    def twilio_api_base(self) -> str:
        return f"{self.base_url}/2010-04-01"

    def requests_to(self, service: str) -> int:
        with self._lock:
            return sum(1 for name, _ in self.requests if name == service)

    # --- scripting ---------------------------------------------------------------------

    def telegram_error(self, error_code: int, description: str, *, chat_id: str | int | None = None,
                       times: int | None = None, retry_after: int | None = None,
                       parameters: dict | None = None) -> None:
        """Answer sendMessage with a Bot API error (for one chat, or all)."""
        body: dict = {"ok": False, "error_code": error_code, "description": description}
        if retry_after is not None or parameters:
            body["parameters"] = {**({"retry_after": retry_after} if retry_after is not None else {}),
                                  **(parameters or {})}
        self._add(Scripted("telegram", error_code, json.dumps(body).encode(),
                           match=None if chat_id is None else str(chat_id), times=times))

    def telegram_raw(self, status: int, body: str, *, chat_id: str | int | None = None,
                     times: int | None = None, content_type: str = "text/html") -> None:
        """Answer with an arbitrary body, e.g. a proxy's HTML error page."""
        self._add(Scripted("telegram", status, body.encode(), content_type,
                           match=None if chat_id is None else str(chat_id), times=times))

    def twilio_error(self, status: int, code: int | None = None, message: str | None = None, *,
                     to: str | None = None, times: int | None = None, retry_after: str | None = None) -> None:
        """Answer Messages.json with a Twilio error (for one number, or all)."""
        body = {"code": code, "message": message or "error", "more_info": f"https://www.twilio.com/docs/errors/{code}",
                "status": status}
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        self._add(Scripted("twilio", status, json.dumps(body).encode(), headers=headers, match=to, times=times))

    def delay(self, seconds: float, *, service: str | None = None, times: int | None = None) -> None:
        """Wait before answering (then answer normally): longer than the client timeout
        makes the client give up while the provider may still accept the message."""
        for name in ([service] if service else ["telegram", "twilio"]):
            self._add(Scripted(name, None, delay=seconds, times=times))

    def reset(self) -> None:
        with self._lock:
            self._generation += 1
            self._wake.set()
            self._wake = threading.Event()
            self._scripts.clear()
            self.telegram_messages.clear()
            self.sms_messages.clear()
            self.webhooks.clear()
            self.requests.clear()
            self.telegram_requests.clear()

    def _add(self, script: Scripted) -> None:
        with self._lock:
            self._scripts.append(script)

    def _scripted(self, service: str, key: str) -> Scripted | None:
        with self._lock:
            for script in self._scripts:
                if script.service == service and script.match in (None, key):
                    if script.times is not None:
                        script.times -= 1
                        if script.times <= 0:
                            self._scripts.remove(script)
                    return script
        return None

    # --- the endpoints -------------------------------------------------------------------

    def handle(self, path: str, params: dict, auth: tuple[str, str] | None) -> tuple[int, dict, dict]:
        """(status, JSON body, headers) for one request; scripts are applied by the handler."""
        match = re.fullmatch(r"/bot([^/]+)/sendMessage", path)
        if match:
            if match.group(1) != self.bot_token:
                return 401, {"ok": False, "error_code": 401, "description": "Unauthorized"}, {}
            return self._send_message(params)
        match = re.fullmatch(r"/bot([^/]+)/(setWebhook|getWebhookInfo)", path)
        if match:
            if match.group(1) != self.bot_token:
                return 401, {"ok": False, "error_code": 401, "description": "Unauthorized"}, {}
            return self._webhook(match.group(2), params)
        match = re.fullmatch(r"/2010-04-01/Accounts/([^/]+)/Messages\.json", path)
        if match:
            if auth != (self.twilio_sid, self.twilio_token) or match.group(1) != self.twilio_sid:
                return 401, _twilio_error(401, 20003, "Authenticate"), {"WWW-Authenticate": 'Basic realm="Twilio API"'}
            return self._create_sms(params)
        return 404, {"ok": False, "error_code": 404, "description": "Not Found"}, {}

    def _send_message(self, params: dict) -> tuple[int, dict, dict]:
        def bad(description: str) -> tuple[int, dict, dict]:
            return 400, {"ok": False, "error_code": 400, "description": f"Bad Request: {description}"}, {}

        chat_id, text = params.get("chat_id"), params.get("text")
        if chat_id in (None, ""):
            return bad("chat_id is empty")
        if not isinstance(text, str) or not text.strip():
            return bad("message text is empty")
        plain = text
        if str(params.get("parse_mode", "")).lower() == "html":
            try:
                plain = parse_html(text)
            except EntityError as exc:
                return bad(f"can't parse entities: {exc}")
        if not plain.strip():
            return bad("message text is empty")
        if utf16_length(plain) > TELEGRAM_MAX_LENGTH:
            return bad("message is too long")
        message_id = next(self._message_ids)
        preview = params.get("link_preview_options")
        disable = params.get("disable_web_page_preview")
        with self._lock:
            self.telegram_messages.append(TelegramMessage(
                str(chat_id), text, params.get("parse_mode"), preview if isinstance(preview, dict) else None,
                None if disable is None else disable in (True, "true", "True", "1"), message_id))
        chat = int(chat_id) if re.fullmatch(r"-?\d+", str(chat_id)) else str(chat_id)
        return 200, {"ok": True, "result": {
            "message_id": message_id,
            "from": {"id": int(self.bot_token.split(":")[0]) if self.bot_token.split(":")[0].isdigit() else 1,
                     "is_bot": True, "first_name": "Fake bot", "username": "fake_bot"},
            "chat": {"id": chat, "type": "private"},
            "date": int(time.time()),
            "text": plain,
        }}, {}

    def _webhook(self, method: str, params: dict) -> tuple[int, dict, dict]:
        """setWebhook (an https URL, as Telegram requires) and getWebhookInfo."""
        if method == "getWebhookInfo":
            with self._lock:
                last = self.webhooks[-1] if self.webhooks else {}
            return 200, {"ok": True, "result": {"url": last.get("url", ""), "has_custom_certificate": False,
                                                "pending_update_count": 0,
                                                **({"allowed_updates": last["allowed_updates"]}
                                                   if "allowed_updates" in last else {})}}, {}
        if not str(params.get("url", "")).startswith("https://"):
            return 400, {"ok": False, "error_code": 400,
                         "description": "Bad Request: bad webhook: An HTTPS URL must be provided for webhook"}, {}
        with self._lock:
            self.webhooks.append(dict(params))
        return 200, {"ok": True, "result": True, "description": "Webhook was set"}, {}

    def _create_sms(self, params: dict) -> tuple[int, dict, dict]:
        to, sender, body = (str(params.get(k) or "") for k in ("To", "From", "Body"))
        if not to:
            return 400, _twilio_error(400, 21604, "A 'To' phone number is required."), {}
        if not sender:
            return 400, _twilio_error(400, 21603, "A 'From' phone number is required."), {}
        if not body:
            return 400, _twilio_error(400, 21602, "Message body is required."), {}
        if not re.fullmatch(r"\+[1-9][0-9]{6,14}", to):
            return 400, _twilio_error(400, 21211, INVALID_TO), {}
        if len(body) > TWILIO_MAX_BODY:
            return 400, _twilio_error(400, 21617, "The concatenated message body exceeds the 1600 character limit."), {}
        sid = "SM" + uuid.uuid4().hex
        with self._lock:
            self.sms_messages.append(SmsMessage(sid, self.twilio_sid, to, sender, body))
        return 201, {"sid": sid, "account_sid": self.twilio_sid, "to": to, "from": sender, "body": body,
                     "status": "queued", "num_segments": "1", "direction": "outbound-api",
                     "error_code": None, "error_message": None}, {}


def _twilio_error(status: int, code: int, message: str) -> dict:
    return {"code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so a requests.Session reuses its connection

    def do_POST(self) -> None:
        api: ProviderApi = self.server.api
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        params = self._params(raw)
        service = "telegram" if self.path.startswith("/bot") else "twilio"
        key = str(params.get("chat_id") if service == "telegram" else params.get("To"))
        with api._lock:
            generation, wake = api._generation, api._wake
            if service == "telegram":
                api.telegram_requests.append((key, time.time()))
        script = api._scripted(service, key)
        if script is not None and script.delay:
            wake.wait(script.delay)
        if api._generation != generation:
            self._answer(503, b'{"ok":false,"error_code":503,"description":"fake reset"}', "application/json", {})
            return
        if script is not None and script.status is not None:
            self._answer(script.status, script.body, script.content_type, script.headers)
        else:
            status, body, headers = api.handle(self.path, params, self._basic_auth())
            self._answer(status, json.dumps(body).encode(), "application/json", headers)
        with api._lock:
            if api._generation == generation:
                api.requests.append((service, self._status))

    def do_GET(self) -> None:
        self._answer(404, b'{"ok":false,"error_code":404,"description":"Not Found"}', "application/json", {})

    def _params(self, raw: bytes) -> dict:
        if "json" in (self.headers.get("Content-Type") or ""):
            try:
                value = json.loads(raw or b"{}")
            except ValueError:
                return {}
            return value if isinstance(value, dict) else {}
        params: dict = {k: v[-1] for k, v in parse_qs(raw.decode("utf-8", "replace")).items()}
        if isinstance(params.get("link_preview_options"), str):  # form bodies carry it as JSON text
            try:
                params["link_preview_options"] = json.loads(params["link_preview_options"])
            except ValueError:
                pass
        return params

    def _basic_auth(self) -> tuple[str, str] | None:
        header = self.headers.get("Authorization") or ""
        if not header.startswith("Basic "):
            return None
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        return user, password

    def _answer(self, status: int, body: bytes, content_type: str, headers: dict) -> None:
        self._status = status
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            self.close_connection = True

    def log_message(self, format, *args) -> None:  # keep test output clean
        pass
