"""The finish vocabulary: a Failure's code is a gRPC status name, checked where it is made."""
import pytest

from model.finish import CODES, Failure, FinishReason


def test_failure_codes_are_grpc_status_names():
    import grpc

    assert CODES == {c.name for c in grpc.StatusCode} - {"OK"}
    assert str(Failure("UNAVAILABLE", "worker decode-0 is unavailable")) == "UNAVAILABLE: worker decode-0 is unavailable"
    with pytest.raises(ValueError, match="code: 'Unavailable'"):
        Failure("Unavailable", "not a status name")


def test_finish_reason_values_are_the_wire_names():
    assert [r.value for r in FinishReason] == ["stop", "length", "abort", "error"]
