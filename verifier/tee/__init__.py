"""TEE evidence checks, pure and shared: TDX quote parsing, dstack event-log
replay to RTMR3, the attested keyset format, the gateway attestation document
check, and the dcap-qvl call for real quotes. Clients use them to verify the
gateway; the gateway uses them to verify providers. They import only the base
dependencies (`cryptography`, `rfc8785`; `dcap-qvl` lazily, for real quotes),
never server code.
"""
