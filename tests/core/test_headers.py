from ntonix.core.headers import client_response_headers, request_id_of, upstream_request_headers


def _upstream(client_headers: list[tuple[bytes, bytes]], api_key: str = "") -> dict[bytes, bytes]:
    headers = upstream_request_headers(
        client_headers,
        host=b"10.0.0.1:8000",
        body_length=5,
        client_address=b"192.0.2.7",
        scheme=b"https",
        request_id=b"rid",
        api_key=api_key,
    )
    names = [name for name, _ in headers]
    assert len(names) == len(set(names)), "no header may be sent twice"
    return dict(headers)


def test_hop_by_hop_and_connection_named_headers_are_not_forwarded() -> None:
    sent = _upstream(
        [
            (b"connection", b"keep-alive, x-secret-hop"),
            (b"keep-alive", b"timeout=5"),
            (b"te", b"trailers"),
            (b"transfer-encoding", b"chunked"),
            (b"upgrade", b"websocket"),
            (b"proxy-connection", b"keep-alive"),
            (b"x-secret-hop", b"1"),
            (b"accept", b"text/event-stream"),
        ]
    )
    assert set(sent) >= {b"accept", b"host", b"content-length"}
    for name in (
        b"connection",
        b"keep-alive",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
        b"x-secret-hop",
    ):
        assert name not in sent


def test_proxy_headers_are_set_and_client_values_are_not_trusted() -> None:
    sent = _upstream(
        [
            (b"host", b"gateway.example"),
            (b"content-length", b"999"),
            (b"x-forwarded-for", b"203.0.113.9"),
            (b"x-forwarded-proto", b"http"),
            (b"x-request-id", b"client-id"),
        ]
    )
    assert sent[b"host"] == b"10.0.0.1:8000"
    assert sent[b"content-length"] == b"5"
    assert sent[b"x-forwarded-for"] == b"203.0.113.9, 192.0.2.7"
    assert sent[b"x-forwarded-proto"] == b"https"
    assert sent[b"x-forwarded-host"] == b"gateway.example"
    assert sent[b"x-request-id"] == b"rid"


def test_client_credentials_never_reach_the_backend() -> None:
    assert b"authorization" not in _upstream([(b"authorization", b"Bearer client-key")])
    replaced = _upstream([(b"authorization", b"Bearer client-key")], api_key="backend-key")
    assert replaced[b"authorization"] == b"Bearer backend-key"


def test_response_headers_drop_hop_by_hop_and_name_backend() -> None:
    headers = client_response_headers(
        [
            (b"content-type", b"text/event-stream"),
            (b"transfer-encoding", b"chunked"),
            (b"connection", b"close"),
            (b"date", b"yesterday"),
            (b"server", b"uvicorn"),
            (b"x-model", b"m"),
        ],
        backend=b"gpu-a",
    )
    assert headers == [
        (b"content-type", b"text/event-stream"),
        (b"x-model", b"m"),
        (b"x-ntonix-backend", b"gpu-a"),
    ]


def test_request_id_is_taken_from_the_client_when_sane() -> None:
    assert request_id_of([(b"x-request-id", b"abc")]) == b"abc"
    assert request_id_of([(b"x-request-id", b"")]) is None
    assert request_id_of([(b"x-request-id", b"x" * 201)]) is None
    assert request_id_of([]) is None
