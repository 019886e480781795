//! RESP front end (placeholder; being written).
