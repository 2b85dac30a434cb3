# Pure-stdlib generator of the UniInst R-50-FPN state-dict key/shape list.
# Mirrors module registration order of b03505036/UniInst @ ff9db774 + detectron2.
import collections
import json
from pathlib import Path
NUM_CLASSES = 80
sd = collections.OrderedDict()
def conv(p, cout, cin, k, bias=True):
    sd[p + ".weight"] = [cout, cin, k, k]
    if bias: sd[p + ".bias"] = [cout]
def frozenbn(p, c):
    for n in ("weight", "bias", "running_mean", "running_var"): sd[p + "." + n] = [c]
def bn(p, c):
    for n in ("weight", "bias", "running_mean", "running_var"): sd[p + "." + n] = [c]
    sd[p + ".num_batches_tracked"] = []
def gn(p, c):
    sd[p + ".weight"] = [c]; sd[p + ".bias"] = [c]

# ---- backbone (detectron2 FPN): laterals/outputs, top_block, bottom_up
FPN_C = 256
for stage, cin in ((3, 512), (4, 1024), (5, 2048)):
    conv(f"backbone.fpn_lateral{stage}", FPN_C, cin, 1)
    conv(f"backbone.fpn_output{stage}", FPN_C, FPN_C, 3)
conv("backbone.top_block.p6", FPN_C, FPN_C, 3)   # in_channels_top = FPN out_channels (from P5)
conv("backbone.top_block.p7", FPN_C, FPN_C, 3)
b = "backbone.bottom_up"
conv(f"{b}.stem.conv1", 64, 3, 7, bias=False); frozenbn(f"{b}.stem.conv1.norm", 64)
in_c, bott, out_c = 64, 64, 256
for s, nblocks in zip((2, 3, 4, 5), (3, 4, 6, 3)):
    for i in range(nblocks):
        p = f"{b}.res{s}.{i}"
        cin = in_c if i == 0 else out_c
        if cin != out_c:
            conv(f"{p}.shortcut", out_c, cin, 1, bias=False); frozenbn(f"{p}.shortcut.norm", out_c)
        conv(f"{p}.conv1", bott, cin, 1, bias=False); frozenbn(f"{p}.conv1.norm", bott)
        conv(f"{p}.conv2", bott, bott, 3, bias=False); frozenbn(f"{p}.conv2.norm", bott)
        conv(f"{p}.conv3", out_c, bott, 1, bias=False); frozenbn(f"{p}.conv3.norm", out_c)
    in_c, bott, out_c = out_c, bott * 2, out_c * 2

# ---- proposal_generator = Uni_fcos; oym_head = Uni_fcos_head
h = "proposal_generator.oym_head"
C = 256
for sub in ("cls_subnet", "instance_subnet"):
    for j in range(4):
        conv(f"{h}.{sub}.{3*j}", C, C, 3); gn(f"{h}.{sub}.{3*j+1}", C)
conv(f"{h}.cls_score", NUM_CLASSES * 1, C, 3)
conv(f"{h}.iou_pred", 1, C, 3)
conv(f"{h}.max3d.conv", C, C, 3); gn(f"{h}.max3d.norm", C)
conv(f"{h}.filter", 1, C, 3)
for j in range(5):
    sd[f"{h}.scales.{j}.scale"] = [1]

# ---- mask_head = DynamicMaskHead (no params; one buffer)
sd["mask_head.sizes_of_interest"] = [5]

# ---- mask_branch = MaskBranch (BN, 128 ch, 4 convs, 8 outputs, no sem-seg head)
MB = 128
for j in range(3):
    conv(f"mask_branch.refine.{j}.0", MB, FPN_C, 3, bias=False); bn(f"mask_branch.refine.{j}.1", MB)
for j in range(4):
    conv(f"mask_branch.tower.{j}.0", MB, MB, 3, bias=False); bn(f"mask_branch.tower.{j}.1", MB)
conv("mask_branch.tower.4", 8, MB, 1)

# ---- controller
in_ch, ch, L = 8, 8, 3
w = [(in_ch + 2) * ch] + [ch * ch] * (L - 2) + [ch]
bs = [ch] * (L - 1) + [1]
num_gen_params = sum(w) + sum(bs)
assert num_gen_params == 169
conv("controller", num_gen_params, C, 3)

with open(Path(__file__).with_name("keys.json"), "w") as f:
    json.dump(sd, f, indent=1)
print(len(sd))
