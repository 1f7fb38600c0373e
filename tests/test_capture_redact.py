from pipeline.redact import redact


def test_rtmp_stream_key():
    assert redact("rtmp://a.rtmp.youtube.com/live2/abcd-efgh-ijkl-mnop") == "rtmp://a.rtmp.youtube.com/live2/***"
    assert redact("rtmps://live-api-s.facebook.com:443/rtmp/FB-123?s_bl=1&s_sc=2") == \
        "rtmps://live-api-s.facebook.com:443/rtmp/***?s_bl=1&s_sc=2"
    assert redact("rtmp://host:1935/live") == "rtmp://host:1935/live"  # no key: the app only
    assert redact("rtmp://h/app/key/") == "rtmp://h/app/***/"


def test_userinfo_and_query_secrets():
    assert redact("rtsp://admin:hunter2@10.0.0.7:554/stream1") == "rtsp://admin:***@10.0.0.7:554/stream1"
    assert redact("http://tok3n@example.com/x.m3u8") == "http://***@example.com/x.m3u8"
    out = redact("https://cdn.example/live.m3u8?token=abc&res=720&Signature=xyz&api_key=k&auth=a&password=p")
    assert out == "https://cdn.example/live.m3u8?token=***&res=720&Signature=***&api_key=***&auth=***&password=***"


def test_srt_passphrase_and_streamid():
    out = redact("srt://h:9000?mode=caller&passphrase=supersecret123&streamid=#!::r=live/x,m=publish&latency=200")
    assert out == "srt://h:9000?mode=caller&passphrase=***&streamid=***&latency=200"


def test_urls_inside_text_and_plain_text():
    msg = "rtmp://127.0.0.1:1/live/sk_live_1: Connection refused (user:pw@ not a url)"
    assert redact(msg) == "rtmp://127.0.0.1:1/live/***: Connection refused (user:pw@ not a url)"
    assert redact("/tmp/video.mp4") == "/tmp/video.mp4"
    assert redact("") == ""
    assert "s3cr3t" not in redact("open 'srt://x:1?passphrase=s3cr3t' failed")


def test_secrets_outside_urls():
    """One redaction for logs and sinks: Twitch tokens and query secrets in free text too."""
    assert redact("PASS oauth:abc123XYZ") == "PASS oauth:***"
    assert redact("POST /hook?token=t0k&x=1 failed") == "POST /hook?token=***&x=1 failed"
    assert redact("cookie;session=s3ss;path=/") == "cookie;session=***;path=/"
    assert redact("rtmp://h/live/k?key=abc") == "rtmp://h/live/***?key=***"
    assert redact(42) == "42"
    assert redact("bad://x?token=abc: unknown, and /y?key=k2.") == "bad://x?token=***: unknown, and /y?key=***."
