"""Credentials never leave the process in text: URIs and error messages that quote them."""

from uniinst.redact import redact_text, redact_uri


def test_redact_uri():
    assert redact_uri("s3://AKIAXX:s3cr3t@bucket/a/b.json?X-Amz-Signature=abc#x") == "s3://bucket/a/b.json"
    assert redact_uri("https://user:pw@host:9000/a.json?token=t") == "https://host:9000/a.json"
    assert redact_uri("gs://bucket/prefix") == "gs://bucket/prefix"
    assert redact_uri("/data/coco?odd name") == "/data/coco?odd name"


def test_redact_text_removes_credentials_from_every_url_in_a_message():
    message = (
        "Could not connect to the endpoint URL: \"http://AKIAXX:s3cr3t@127.0.0.1:9/bucket/key?X-Amz-Signature=zz\" "
        "while reading s3://id:SECRET@bucket/shards/manifest.json, see https://docs.example/x"
    )
    out = redact_text(message)
    assert "s3cr3t" not in out and "SECRET" not in out and "AKIAXX" not in out and "zz" not in out
    assert '"http://127.0.0.1:9/bucket/key"' in out
    assert "s3://bucket/shards/manifest.json," in out
    assert out.endswith("https://docs.example/x")


def test_redact_text_leaves_plain_text_and_emails_alone():
    text = "model_0000300.pt: missing key head.cls_logits.weight (ask admin@example.org)"
    assert redact_text(text) == text
