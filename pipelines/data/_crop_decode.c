/* Partial JPEG decode: only the rows and MCU columns of one crop box, at a DCT scale 1/k.
 *
 * Against the system libjpeg-turbo (Debian libjpeg62-turbo-dev 2.1.5: the TurboJPEG 3 API
 * with tj3SetCroppingRegion needs libjpeg-turbo 3, which Debian 12 lacks), through the
 * libjpeg API that libjpeg-turbo extends since 1.5:
 *   - jpeg_crop_scanline: IDCT, upsampling and colour conversion only for the iMCU columns
 *     that hold the box (the left edge is widened down to an iMCU boundary);
 *   - jpeg_skip_scanlines: rows above the box are entropy-decoded (the Huffman stream has no
 *     index) but get no IDCT or colour conversion;
 *   - rows below the box are never read: the decode stops after the box's last row.
 * Same decoder settings as simplejpeg's default (TurboJPEG: ISLOW IDCT, fancy upsampling),
 * so the pixels are the full decode's, bit for bit (tests/pipelines/test_crop_decode.py).
 *
 * Python: decode_into(data, out, height, width, k, y0, x0, h, w) -> None | str
 *   data: the JPEG (any bytes-like); out: writable C-contiguous buffer of h*w*3 bytes;
 *   (height, width): the header's size (checked); k in {1, 2, 4, 8}; (y0, x0, h, w): the box
 *   in the 1/k-scale image. Returns None on success, else why it refused ("progressive",
 *   "CMYK", "12-bit", "arithmetic", "components", "corrupt: <libjpeg's message>", ...): the
 *   caller falls back to the full decode and counts the reason. The GIL is released.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char msg[JMSG_LENGTH_MAX];
} error_mgr;

static void on_error(j_common_ptr cinfo)
{
    error_mgr *err = (error_mgr *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->msg);
    longjmp(err->jump, 1);
}

/* Warnings (level -1: corrupt data, premature end) stop the decode, as simplejpeg's strict
 * mode does, so a damaged JPEG takes today's path (libjpeg-turbo, then PIL) unchanged. */
static void on_message(j_common_ptr cinfo, int level)
{
    if (level < 0)
        on_error(cinfo);
}

/* NULL on success, else a static reason; for "corrupt" the detail is in msg. Runs without
 * the GIL: touches no Python object. */
static const char *decode(const unsigned char *data, size_t size, unsigned char *out,
                          int height, int width, int k, int y0, int x0, int h, int w,
                          char *msg)
{
    struct jpeg_decompress_struct cinfo;
    error_mgr err;
    JSAMPROW volatile row = NULL;
    const char *volatile reason = NULL;

    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.emit_message = on_message;
    err.msg[0] = '\0';
    if (setjmp(err.jump)) {
        reason = err.pub.msg_code == JERR_BAD_PRECISION ? "12-bit" : "corrupt";
        snprintf(msg, JMSG_LENGTH_MAX, "%s", err.msg);
        goto done;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, (unsigned long)size);
    jpeg_read_header(&cinfo, TRUE);
    /* a progressive scan would be buffered whole before any row comes out: no gain */
    if (cinfo.progressive_mode) { reason = "progressive"; goto done; }
    if (cinfo.arith_code) { reason = "arithmetic"; goto done; }
    if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
        reason = "CMYK";  /* Adobe's inverted CMYK: PIL's job, as in today's decode_rgb */
        goto done;
    }
    if (cinfo.num_components != 1 && cinfo.num_components != 3) { reason = "components"; goto done; }
    if ((int)cinfo.image_height != height || (int)cinfo.image_width != width) {
        reason = "size mismatch";
        goto done;
    }
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)k;
    cinfo.dct_method = JDCT_ISLOW;
    cinfo.do_fancy_upsampling = TRUE;
    cinfo.do_block_smoothing = FALSE;
    jpeg_start_decompress(&cinfo);
    if (cinfo.output_components != 3 || y0 + h > (int)cinfo.output_height ||
        x0 + w > (int)cinfo.output_width) {
        reason = "box outside the image";
        goto done;
    }
    {
        /* The fancy upsampler treats the crop's edges as the image's (it replicates the edge
         * chroma sample there), so a box column at a crop edge would differ from the full
         * decode by up to 4/255 (4:2:0 photos) or 9/255 (4:2:2 at 1/4). Hence one column
         * before the box (libjpeg then widens left to the iMCU boundary below it) and 16
         * after: each output pixel reads the chroma samples of its neighbours only. */
        JDIMENSION left = (JDIMENSION)(x0 > 0 ? x0 - 1 : 0), right = (JDIMENSION)(x0 + w + 16), cols;
        size_t shift, stride = (size_t)w * 3;
        int i;

        if (right > cinfo.output_width)
            right = cinfo.output_width;
        cols = right - left;
        if (cols < cinfo.output_width)
            jpeg_crop_scanline(&cinfo, &left, &cols);  /* left < x0 (or 0), left + cols >= x0 + w */
        shift = (size_t)(x0 - (int)left) * 3;
        row = (JSAMPROW)malloc((size_t)cinfo.output_width * 3);
        if (row == NULL) { reason = "out of memory"; goto done; }
        if (y0 > 0 && jpeg_skip_scanlines(&cinfo, (JDIMENSION)y0) != (JDIMENSION)y0) {
            reason = "corrupt";
            snprintf(msg, JMSG_LENGTH_MAX, "could not skip to row %d", y0);
            goto done;
        }
        for (i = 0; i < h; i++) {
            JSAMPROW r = row;
            if (jpeg_read_scanlines(&cinfo, &r, 1) != 1) {
                reason = "corrupt";
                snprintf(msg, JMSG_LENGTH_MAX, "no row %d", y0 + i);
                goto done;
            }
            memcpy(out + (size_t)i * stride, row + shift, stride);
        }
    }
done:
    free(row);
    jpeg_destroy_decompress(&cinfo);  /* also aborts: the rows below the box stay unread */
    return reason;
}

static PyObject *decode_into(PyObject *self, PyObject *args)
{
    Py_buffer data, out;
    int height, width, k, y0, x0, h, w;
    const char *reason = NULL;
    char msg[JMSG_LENGTH_MAX] = "";

    (void)self;
    if (!PyArg_ParseTuple(args, "y*w*iiiiiii:decode_into", &data, &out, &height, &width, &k,
                          &y0, &x0, &h, &w))
        return NULL;
    if ((k != 1 && k != 2 && k != 4 && k != 8) || h <= 0 || w <= 0 || y0 < 0 || x0 < 0 ||
        height <= 0 || width <= 0) {
        PyBuffer_Release(&data);
        PyBuffer_Release(&out);
        return PyErr_Format(PyExc_ValueError, "decode_into: bad scale %d or box (%d, %d, %d, %d)",
                            k, y0, x0, h, w);
    }
    if (out.len != (Py_ssize_t)h * w * 3) {
        Py_ssize_t len = out.len;
        PyBuffer_Release(&data);
        PyBuffer_Release(&out);
        return PyErr_Format(PyExc_ValueError, "decode_into: out has %zd bytes, the box needs %zd",
                            len, (Py_ssize_t)h * w * 3);
    }
    Py_BEGIN_ALLOW_THREADS
    reason = decode((const unsigned char *)data.buf, (size_t)data.len, (unsigned char *)out.buf,
                    height, width, k, y0, x0, h, w, msg);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    if (reason == NULL)
        Py_RETURN_NONE;
    if (msg[0])
        return PyUnicode_FromFormat("%s: %s", reason, msg);
    return PyUnicode_FromString(reason);
}

static PyMethodDef methods[] = {
    {"decode_into", decode_into, METH_VARARGS,
     "decode_into(data, out, height, width, k, y0, x0, h, w) -> None | reason: decode the box "
     "(y0, x0, h, w) of the 1/k-scale image into out (h*w*3 bytes, RGB)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_crop_decode",
    "Partial JPEG decode of a crop box against the system libjpeg-turbo.", -1, methods,
};

PyMODINIT_FUNC PyInit__crop_decode(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m != NULL)
        PyModule_AddIntConstant(m, "LIBJPEG_TURBO_VERSION_NUMBER",
#ifdef LIBJPEG_TURBO_VERSION_NUMBER
                                LIBJPEG_TURBO_VERSION_NUMBER
#else
                                0
#endif
        );
    return m;
}
