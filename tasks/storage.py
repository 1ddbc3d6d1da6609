"""Opening the output store from Prefect: credentials from a Prefect block, or the standard AWS_* variables."""

from __future__ import annotations

import os

from fastimagic.store import Store, StoreError, open_store, read_uri

# Name of a Prefect AwsCredentials or MinIOCredentials block to use for s3:// URIs (else the AWS_* variables).
CREDENTIALS_BLOCK_ENV = "FASTIMAGIC_S3_CREDENTIALS_BLOCK"


def boto3_session(block_name: str | None = None):
    """A ``boto3.Session`` from a Prefect ``AwsCredentials`` or ``MinIOCredentials`` block, or None.

    ``block_name`` defaults to ``$FASTIMAGIC_S3_CREDENTIALS_BLOCK``. A MinIO block's endpoint (its client
    parameters) is exported as ``AWS_ENDPOINT_URL_S3`` for this process unless one is already set.
    """
    block_name = block_name or os.environ.get(CREDENTIALS_BLOCK_ENV)
    if not block_name:
        return None
    try:
        from prefect_aws import AwsCredentials, MinIOCredentials
    except ImportError:
        raise StoreError(
            f"credentials block '{block_name}': install prefect-aws to use Prefect credential blocks"
        ) from None
    last: Exception | None = None
    for cls in (MinIOCredentials, AwsCredentials):
        try:
            creds = cls.load(block_name)
        except (ValueError, TypeError) as e:  # not a block of this type, or missing
            last = e
            continue
        endpoint = getattr(getattr(creds, "aws_client_parameters", None), "endpoint_url", None)
        if endpoint and not os.environ.get("AWS_ENDPOINT_URL_S3"):
            os.environ["AWS_ENDPOINT_URL_S3"] = str(endpoint)
        return creds.get_boto3_session()
    raise StoreError(
        f"credentials block '{block_name}': no AwsCredentials or MinIOCredentials block by that name"
        f" ({type(last).__name__})"
    )


def output_store(uri: str, block_name: str | None = None) -> Store:
    """The store at ``uri`` (local folder or s3://bucket/prefix), with credentials resolved as above."""
    session = boto3_session(block_name) if uri.startswith("s3://") else None
    return open_store(uri, session=session)


def read(uri: str, max_bytes: int | None = None, within: tuple[str, ...] | None = None) -> bytes:
    """One object or file (``s3://bucket/key`` or a path), with the same credentials as :func:`output_store`;
    ``max_bytes``: refuse anything larger without reading it (local paths must be regular files). ``within``: the
    local folders a policy allows, checked on the file as opened (:func:`fastimagic.store.read_local`)."""
    session = boto3_session() if str(uri).startswith("s3://") else None
    return read_uri(uri, session=session, max_bytes=max_bytes, within=within)
