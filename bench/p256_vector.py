# The P-256 signature the verify benchmarks check: NIST CAVP SigVer [P-256,SHA-256], a valid
# one. Shared by bench/ota_verify.py (Unix port) and bench/mcu/pure.py (QEMU guests).
PUB = bytes.fromhex(
    "04e424dc61d4bb3cb7ef4344a7f8957a0c5134e16f7a67c074f82e6e12f49abf3c"
    "970eed7aa2bc48651545949de1dddaf0127e5965ac85d1243d6f60e7dfaee927")
MSG = bytes.fromhex(
    "e1130af6a38ccb412a9c8d13e15dbfc9e69a16385af3c3f1e5da954fd5e7c45fd75e2b8c36699228e92840c0"
    "562fbf3772f07e17f1add56588dd45f7450e1217ad239922dd9c32695dc71ff2424ca0dec1321aa47064a044"
    "b7fe3c2b97d03ce470a592304c5ef21eed9f93da56bb232d1eeb0035f9bf0dfafdcc4606272b20a3")
SIG = bytes.fromhex(
    "bf96b99aa49c705c910be33142017c642ff540c76349b9dab72f981fd9347f4f"
    "17c55095819089c2e03b9cd415abdf12444e323075d98f31920b9e0f57ec871c")
