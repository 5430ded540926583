"""A local stand-in for Google Ads' ConversionUploadService, speaking the real gRPC protocol.

Start one with :class:`SandboxServer`; the real ``GoogleAdsClient`` reaches it
over TLS once ``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH`` names its certificate.
"""

from callconv.sandbox.server import (
    ActionSpec,
    SandboxServer,
    ensure_certificate,
    load_calls_from_warehouse,
)

__all__ = ["ActionSpec", "SandboxServer", "ensure_certificate", "load_calls_from_warehouse"]
