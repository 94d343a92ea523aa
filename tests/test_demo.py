"""``agenthub demo``'s reading of replies: a 202 (the reply came after the ingress stopped waiting) is not a failure."""

from __future__ import annotations

import httpx
import pytest

from cluster.demo import _reply_text


def test_a_reply_after_a_202_is_read_from_the_log() -> None:
    polls: list[httpx.Request] = []

    def log(request: httpx.Request) -> httpx.Response:
        polls.append(request)
        if len(polls) < 3:  # the restarted runner has not answered yet
            return httpx.Response(200, json=[])
        reply = {"type": "chat.reply_sent", "meta": {"causation_id": "m1"}, "data": {"response": "turn 4"}}
        other = {"type": "chat.reply_sent", "meta": {"causation_id": "m0"}, "data": {"response": "turn 3"}}
        return httpx.Response(200, json=[other, reply])

    http = httpx.Client(base_url="http://hub", transport=httpx.MockTransport(log))
    accepted = httpx.Response(202, json={"status": "accepted", "event_id": "m1"}, request=httpx.Request("POST", "/"))
    assert _reply_text(http, "desk", "alice", accepted, timeout=10) == "turn 4"
    assert polls[-1].url.params["stream"] == "chat-desk/alice"
    assert polls[-1].url.params.get_list("type") == ["chat.reply_sent", "chat.reply_failed"]

    answered = httpx.Response(200, json={"response": "at once"}, request=httpx.Request("POST", "/"))
    assert _reply_text(http, "desk", "alice", answered) == "at once"
    failed = httpx.Response(502, json={"detail": "provider down"}, request=httpx.Request("POST", "/"))
    with pytest.raises(httpx.HTTPStatusError):
        _reply_text(http, "desk", "alice", failed)
