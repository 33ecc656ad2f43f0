import ctypes, gc, resource, torch, host
from helpers import pil_to_image, run_node, make_image, pipeline

def rss():
    for l in open("/proc/self/status"):
        if l.startswith("VmRSS"): return int(l.split()[1]) // 1024

def test_rss(world, pisa_model):
    libc = ctypes.CDLL("libc.so.6")
    seq = [((200,72),48,"wavelet"), ((48,120),96,"none"), ((200,72),96,"wavelet"), ((64,64),0,"wavelet"),
           ((136,136),48,"adain"), ((48,120),96,"wavelet"), ((200,72),0,"adain"), ((48,120),96,"wavelet")]
    print("start", rss())
    for (w,h), tile, fix in seq:
        img = pil_to_image(make_image(w, h, seed=3))
        (lat,) = run_node("PiSA_EncodeLQ", image=img, vae=world.comfy_vae, upscale=4, resize_filter="bicubic")
        r1 = rss()
        (hq,) = run_node("PiSA_Sample", model=pisa_model, positive=world.conditioning, latent=lat, lambda_pix=0.8,
                         lambda_sem=1.2, tile_size=tile, tile_overlap=32)
        r2 = rss()
        (out,) = run_node("PiSA_Decode", latent=hq, vae=world.comfy_vae, color_fix=fix)
        r3 = rss()
        del lat, hq, out; gc.collect()
        r4 = rss()
        libc.malloc_trim(0)
        r5 = rss()
        print(f"{w}x{h} tile {tile} {fix}: enc {r1} samp {r2} dec {r3} freed {r4} trimmed {r5} maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss//1024}", flush=True)
