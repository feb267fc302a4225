import purerpc
from . import cache_pb2 as cache__pb2
import google.protobuf.empty_pb2 as google_dot_protobuf_dot_empty__pb2


class CacheServiceServicer(purerpc.Servicer):
    async def Config(self, input_message):
        raise NotImplementedError()

    async def GetBaseVM(self, input_message):
        raise NotImplementedError()

    async def Status(self, input_message):
        raise NotImplementedError()

    async def Quit(self, input_message):
        raise NotImplementedError()

    async def Watch(self, input_message):
        raise NotImplementedError()

    async def TakeVM(self, input_messages):
        raise NotImplementedError()

    async def StopVM(self, input_message):
        raise NotImplementedError()

    @property
    def service(self) -> purerpc.Service:
        service_obj = purerpc.Service(
            "cache.CacheService"
        )
        service_obj.add_method(
            "Config",
            self.Config,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                google_dot_protobuf_dot_empty__pb2.Empty,
                cache__pb2.GrpcVMConfig,
            )
        )
        service_obj.add_method(
            "GetBaseVM",
            self.GetBaseVM,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                google_dot_protobuf_dot_empty__pb2.Empty,
                cache__pb2.GrpcVM,
            )
        )
        service_obj.add_method(
            "Status",
            self.Status,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                google_dot_protobuf_dot_empty__pb2.Empty,
                cache__pb2.GrpcStatus,
            )
        )
        service_obj.add_method(
            "Quit",
            self.Quit,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                google_dot_protobuf_dot_empty__pb2.Empty,
                google_dot_protobuf_dot_empty__pb2.Empty,
            )
        )
        service_obj.add_method(
            "Watch",
            self.Watch,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                google_dot_protobuf_dot_empty__pb2.Empty,
                cache__pb2.GrpcEvent,
            )
        )
        service_obj.add_method(
            "TakeVM",
            self.TakeVM,
            purerpc.RPCSignature(
                purerpc.Cardinality.STREAM_STREAM,
                cache__pb2.TakeRequest,
                cache__pb2.TakeReply,
            )
        )
        service_obj.add_method(
            "StopVM",
            self.StopVM,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                cache__pb2.StopVMRequest,
                cache__pb2.StopVMReply,
            )
        )
        return service_obj


class CacheServiceStub:
    def __init__(self, channel):
        self._client = purerpc.Client(
            "cache.CacheService",
            channel
        )
        self.Config = self._client.get_method_stub(
            "Config",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                google_dot_protobuf_dot_empty__pb2.Empty,
                cache__pb2.GrpcVMConfig,
            )
        )
        self.GetBaseVM = self._client.get_method_stub(
            "GetBaseVM",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                google_dot_protobuf_dot_empty__pb2.Empty,
                cache__pb2.GrpcVM,
            )
        )
        self.Status = self._client.get_method_stub(
            "Status",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                google_dot_protobuf_dot_empty__pb2.Empty,
                cache__pb2.GrpcStatus,
            )
        )
        self.Quit = self._client.get_method_stub(
            "Quit",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                google_dot_protobuf_dot_empty__pb2.Empty,
                google_dot_protobuf_dot_empty__pb2.Empty,
            )
        )
        self.Watch = self._client.get_method_stub(
            "Watch",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                google_dot_protobuf_dot_empty__pb2.Empty,
                cache__pb2.GrpcEvent,
            )
        )
        self.TakeVM = self._client.get_method_stub(
            "TakeVM",
            purerpc.RPCSignature(
                purerpc.Cardinality.STREAM_STREAM,
                cache__pb2.TakeRequest,
                cache__pb2.TakeReply,
            )
        )
        self.StopVM = self._client.get_method_stub(
            "StopVM",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                cache__pb2.StopVMRequest,
                cache__pb2.StopVMReply,
            )
        )