"""The tests' Label Studio harness: a re-export of backend.local_label_studio (used by the demo)."""

from backend.local_label_studio import (
    EMAIL,
    LS_BIN,
    PASSWORD,
    LabelStudio,
    free_port,
    login_session,
    wait_http,
)

__all__ = ["EMAIL", "LS_BIN", "PASSWORD", "LabelStudio", "free_port", "login_session", "wait_http"]
