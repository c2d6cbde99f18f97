import torch
from splitserve.pipeline import green
d = torch.device("cuda", 0)
torch.cuda.init(); x = torch.zeros(1, device=d)
print("before", torch.cuda.mem_get_info(d), torch.cuda.memory_reserved(d))
p = green.split(d, 48)
print("after split", torch.cuda.mem_get_info(d), torch.cuda.memory_reserved(d))
print(green.sm_ids(p.attention_stream).__len__(), green.sm_ids(p.ffn_stream).__len__())
print("after probe", torch.cuda.mem_get_info(d))
for f in (None, 48, 64, 96):
    try:
        q = green.split(d, 32, f); print("split 32 /", f, "->", q.attention_sm, q.ffn_sm)
    except Exception as e: print("split 32 /", f, "failed", e)
print("end", torch.cuda.mem_get_info(d))
