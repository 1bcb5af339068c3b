"""The descriptor pool of the KServe v2 protos. tritonclient's generated code puts the same `inference.*`
names into protobuf's default pool; ours live here instead, so both import in one process."""
from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
