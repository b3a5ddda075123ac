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
 * A JPEG with restart markers that tile its MCU grid (crossmae-prep --jpeg-restarts: transcode_restarts
 * below) is first cut, without decoding, into a smaller JPEG of just the restart cells around the box
 * (the restart-marker cut, below), so even the Huffman pass skips the rest.
 *
 * Python: decode_into(data, out, height, width, k, y0, x0, h, w) -> None | str
 *   data: the JPEG (any bytes-like); out: writable C-contiguous buffer of h*w*3 bytes;
 *   (height, width): the header's size (checked); k in {1, 2, 4, 8}; (y0, x0, h, w): the box
 *   in the 1/k-scale image. Returns None on success, else why it refused ("progressive",
 *   "CMYK", "12-bit", "arithmetic", "components", "corrupt: <libjpeg's message>", ...): the
 *   caller falls back to the full decode and counts the reason. The GIL is released.
 * Also transcode_restarts(data, cell_px=32) -> bytes | reason, restart_cells(data) -> grid | None,
 * cut_box(data, y0, x0, h, w) -> (jpeg, top, left) | None (decode="gpu"), cut_counts() -> dict.
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

/* ---- Restart-marker cut: decode a JPEG of just the box's MCU cells -------------------------------
 * A JPEG whose restart interval tiles its MCU grid (the interval divides the MCUs per row, or is a
 * whole number of rows) can be cut at interval boundaries without decoding anything: each interval
 * starts byte-aligned with the DC predictions reset. The cells that cover the box (plus MARGIN
 * output pixels, so the fancy upsampler never sees a cut edge) are copied, renumbered, into a
 * smaller JPEG with the same tables, which decodes to the same pixels as the full image there. So
 * the Huffman pass over the rows above the box, and over the columns beside it, disappears.
 * `crossmae-prep --jpeg-restarts` writes such JPEGs (transcode below: lossless). */
#define MARGIN 2  /* output pixels kept beyond the box on each side that is not the image's edge */

typedef struct {
    size_t sof, scan;           /* SOF marker offset (its size bytes are patched in a cut), first scan byte */
    int height, width, cell_h, cell_w, qx, qy;  /* image; cells (intervals) in full-res px, grid qx x qy */
    size_t n;                   /* intervals */
    size_t *starts, *ends;      /* interval j's entropy bytes: [starts[j], ends[j]) */
} cells_t;

static unsigned long cuts_done, cuts_whole, cuts_failed;  /* this process; updated with the GIL held */

static void cells_free(cells_t *c) { free(c->starts); free(c->ends); c->starts = c->ends = NULL; }

/* 0 and the layout filled in, or -1: not a single-scan 8-bit Huffman JPEG with such restarts. */
static int cells_parse(const unsigned char *d, size_t n, cells_t *c)
{
    size_t i = 2, p;
    int found = 0, interval = 0, nc = 0, hmax = 1, vmax = 1, mcu_w, mcu_h, mcus_x, mcus_y, cw, ch, j;

    memset(c, 0, sizeof(*c));
    if (n < 4 || d[0] != 0xFF || d[1] != 0xD8)
        return -1;
    for (;;) {
        unsigned int m, len;
        if (i + 4 > n || d[i] != 0xFF)
            return -1;
        m = d[i + 1];
        if (m == 0xFF) { i++; continue; }
        if (m == 0xD8 || m == 0x01 || (m >= 0xD0 && m <= 0xD7)) { i += 2; continue; }
        if (m == 0xD9)
            return -1;
        len = ((unsigned int)d[i + 2] << 8) | d[i + 3];
        if (len < 2 || i + 2 + len > n)
            return -1;
        if (m == 0xC0 || m == 0xC1) {
            int k;
            if (found || len < 8 || d[i + 4] != 8)
                return -1;
            c->height = (d[i + 5] << 8) | d[i + 6];
            c->width = (d[i + 7] << 8) | d[i + 8];
            nc = d[i + 9];
            if ((nc != 1 && nc != 3) || len < 8 + 3 * (unsigned int)nc || !c->height || !c->width)
                return -1;
            for (k = 0; k < nc; k++) {
                int hs = d[i + 11 + 3 * k] >> 4, vs = d[i + 11 + 3 * k] & 15;
                if (hs < 1 || hs > 4 || vs < 1 || vs > 4)
                    return -1;
                hmax = hs > hmax ? hs : hmax;
                vmax = vs > vmax ? vs : vmax;
            }
            c->sof = i;
            found = 1;
        } else if (m >= 0xC2 && m <= 0xCF && m != 0xC4 && m != 0xC8 && m != 0xCC) {
            return -1;  /* progressive, lossless, arithmetic-coded, hierarchical */
        } else if (m == 0xDD) {
            if (len != 4)
                return -1;
            interval = (d[i + 4] << 8) | d[i + 5];
        } else if (m == 0xDA) {
            if (!found || len < 6 || d[i + 4] != nc)
                return -1;  /* one interleaved scan of every component only */
            c->scan = i + 2 + len;
            break;
        }
        i += 2 + len;
    }
    if (interval <= 0)
        return -1;
    mcu_w = nc == 1 ? 8 : 8 * hmax;
    mcu_h = nc == 1 ? 8 : 8 * vmax;
    mcus_x = (c->width + mcu_w - 1) / mcu_w;
    mcus_y = (c->height + mcu_h - 1) / mcu_h;
    if (mcus_x % interval == 0) { cw = interval; ch = 1; }
    else if (interval % mcus_x == 0) { cw = mcus_x; ch = interval / mcus_x; }
    else return -1;
    c->qx = mcus_x / cw;
    c->qy = (mcus_y + ch - 1) / ch;
    c->cell_w = cw * mcu_w;
    c->cell_h = ch * mcu_h;
    c->n = (size_t)c->qx * (size_t)c->qy;
    c->starts = (size_t *)malloc(c->n * sizeof(size_t));
    c->ends = (size_t *)malloc(c->n * sizeof(size_t));
    if (!c->starts || !c->ends) { cells_free(c); return -1; }
    c->starts[0] = c->scan;
    for (p = c->scan, j = 0;;) {
        const unsigned char *q = (const unsigned char *)memchr(d + p, 0xFF, n - p);
        size_t f;
        if (q == NULL) { cells_free(c); return -1; }
        for (f = (size_t)(q - d) + 1; f < n && d[f] == 0xFF; f++) ;
        if (f >= n) { cells_free(c); return -1; }
        if (d[f] == 0x00) { p = f + 1; continue; }
        if (d[f] >= 0xD0 && d[f] <= 0xD7 && d[f] - 0xD0 == j % 8 && (size_t)j + 1 < c->n) {
            c->ends[j++] = (size_t)(q - d);
            c->starts[j] = f + 1;
            p = f + 1;
            continue;
        }
        if (d[f] == 0xD9 && (size_t)j + 1 == c->n) { c->ends[j] = (size_t)(q - d); break; }
        cells_free(c);  /* another marker, a misnumbered restart, too many or too few intervals */
        return -1;
    }
    return 0;
}

/* The JPEG of cells [cy0, cy1) x [cx0, cx1) into *buf (malloc'd); its size, or 0 if out of memory. */
static size_t cells_cut(const unsigned char *d, const cells_t *c, int cy0, int cy1, int cx0, int cx1,
                        unsigned char **buf)
{
    size_t size = c->scan + 2, o = 0;
    int y, x, r = 0, last = (cy1 - cy0) * (cx1 - cx0) - 1;
    int h = (cy1 * c->cell_h < c->height ? cy1 * c->cell_h : c->height) - cy0 * c->cell_h;
    int w = (cx1 * c->cell_w < c->width ? cx1 * c->cell_w : c->width) - cx0 * c->cell_w;

    for (y = cy0; y < cy1; y++)
        for (x = cx0; x < cx1; x++) {
            size_t j = (size_t)y * c->qx + x;
            size += c->ends[j] - c->starts[j] + 2;
        }
    *buf = (unsigned char *)malloc(size);
    if (*buf == NULL)
        return 0;
    memcpy(*buf, d, c->scan);  /* every segment up to the scan, tables and restart interval as they are */
    (*buf)[c->sof + 5] = (unsigned char)(h >> 8);
    (*buf)[c->sof + 6] = (unsigned char)h;
    (*buf)[c->sof + 7] = (unsigned char)(w >> 8);
    (*buf)[c->sof + 8] = (unsigned char)w;
    o = c->scan;
    for (y = cy0; y < cy1; y++)
        for (x = cx0; x < cx1; x++) {
            size_t j = (size_t)y * c->qx + x, len = c->ends[j] - c->starts[j];
            memcpy(*buf + o, d + c->starts[j], len);
            o += len;
            (*buf)[o++] = 0xFF;
            (*buf)[o++] = r == last ? 0xD9 : (unsigned char)(0xD0 + r % 8);
            r++;
        }
    return o;
}

/* The cells [cy0, cy1) x [cx0, cx1) that hold the box (y0, x0, h, w) of the 1/k-scale image plus
 * MARGIN output pixels each side; 0 when that is every cell (nothing to cut). */
static int cells_for_box(const cells_t *c, int k, int y0, int x0, int h, int w, int *cy0, int *cy1, int *cx0,
                         int *cx1)
{
    int top = (y0 > MARGIN ? y0 - MARGIN : 0) * k, left = (x0 > MARGIN ? x0 - MARGIN : 0) * k;
    int bottom = (y0 + h + MARGIN) * k, right = (x0 + w + MARGIN) * k;
    *cy0 = top / c->cell_h;
    *cx0 = left / c->cell_w;
    *cy1 = (bottom + c->cell_h - 1) / c->cell_h;
    *cx1 = (right + c->cell_w - 1) / c->cell_w;
    *cy1 = *cy1 > c->qy ? c->qy : *cy1;
    *cx1 = *cx1 > c->qx ? c->qx : *cx1;
    return *cy0 > 0 || *cx0 > 0 || *cy1 < c->qy || *cx1 < c->qx;
}

/* decode(), through the cut where the JPEG allows it; the whole JPEG's decode otherwise (and
 * whenever the cut's decode fails, so a damaged cut never changes what the caller gets). *how:
 * 1 cut, 0 whole (no usable restarts, or the box needs every cell), -1 the cut failed. */
static const char *decode_cells(const unsigned char *data, size_t size, unsigned char *out, int height,
                                int width, int k, int y0, int x0, int h, int w, char *msg, int *how)
{
    cells_t c;
    *how = 0;
    if (cells_parse(data, size, &c) == 0) {
        if (c.height == height && c.width == width) {
            int cy0, cy1, cx0, cx1;
            if (cells_for_box(&c, k, y0, x0, h, w, &cy0, &cy1, &cx0, &cx1)) {
                unsigned char *buf = NULL;
                size_t n = cells_cut(data, &c, cy0, cy1, cx0, cx1, &buf);
                int oy = cy0 * c.cell_h, ox = cx0 * c.cell_w;
                int sh = (cy1 * c.cell_h < height ? cy1 * c.cell_h : height) - oy;
                int sw = (cx1 * c.cell_w < width ? cx1 * c.cell_w : width) - ox;
                const char *reason = n ? decode(buf, n, out, sh, sw, k, y0 - oy / k, x0 - ox / k, h, w, msg)
                                       : "out of memory";
                free(buf);
                cells_free(&c);
                if (reason == NULL) { *how = 1; return NULL; }
                *how = -1;
                msg[0] = '\0';
                return decode(data, size, out, height, width, k, y0, x0, h, w, msg);
            }
        }
        cells_free(&c);
    }
    return decode(data, size, out, height, width, k, y0, x0, h, w, msg);
}

/* ---- Lossless transcode with restart markers (crossmae-prep --jpeg-restarts) ------------------------
 * The DCT coefficients are copied, not re-quantized (jpeg_read_coefficients/jpeg_write_coefficients,
 * as jpegtran does), so every decoder gives the same pixels. Written baseline sequential (a
 * progressive input becomes sequential), with optimized Huffman tables, every marker segment the
 * input had (EXIF, ICC, comments) but the JFIF/Adobe header libjpeg writes itself, and a restart
 * interval that divides the MCUs per row into cells about `cell_px` wide. */
static unsigned int restart_mcus(int mcus_x, int mcu_w, int cell_px)
{
    int best = 1, dv;
    for (dv = 1; dv <= mcus_x; dv++)
        if (mcus_x % dv == 0 && abs(dv * mcu_w - cell_px) < abs(best * mcu_w - cell_px))
            best = dv;
    return (unsigned int)best;
}

static const char *transcode(const unsigned char *data, size_t size, int cell_px, unsigned char **out,
                             unsigned long *out_size, char *msg)
{
    struct jpeg_decompress_struct src;
    struct jpeg_compress_struct dst;
    error_mgr err;
    const char *volatile reason = NULL;
    int m;

    memset(&src, 0, sizeof(src));  /* jpeg_destroy_* of a struct never created is then a no-op */
    memset(&dst, 0, sizeof(dst));
    src.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.emit_message = on_message;
    err.msg[0] = '\0';
    dst.err = &err.pub;
    if (setjmp(err.jump)) {
        reason = err.pub.msg_code == JERR_BAD_PRECISION ? "12-bit" : "corrupt";
        snprintf(msg, JMSG_LENGTH_MAX, "%s", err.msg);
        goto done;
    }
    jpeg_create_decompress(&src);
    jpeg_create_compress(&dst);
    jpeg_mem_src(&src, data, (unsigned long)size);
    jpeg_save_markers(&src, JPEG_COM, 0xFFFF);
    for (m = 0; m < 16; m++)
        jpeg_save_markers(&src, JPEG_APP0 + m, 0xFFFF);
    jpeg_read_header(&src, TRUE);
    if (src.arith_code) { reason = "arithmetic"; goto done; }
    if (src.jpeg_color_space == JCS_CMYK || src.jpeg_color_space == JCS_YCCK) { reason = "CMYK"; goto done; }
    if (src.num_components != 1 && src.num_components != 3) { reason = "components"; goto done; }
    {
        jvirt_barray_ptr *coefs = jpeg_read_coefficients(&src);
        jpeg_saved_marker_ptr mk;
        int mcu_w = src.num_components == 1 ? 8 : 8 * src.max_h_samp_factor;
        jpeg_copy_critical_parameters(&src, &dst);
        dst.optimize_coding = TRUE;
        dst.restart_interval = restart_mcus(((int)src.image_width + mcu_w - 1) / mcu_w, mcu_w, cell_px);
        jpeg_mem_dest(&dst, out, out_size);
        jpeg_write_coefficients(&dst, coefs);
        for (mk = src.marker_list; mk != NULL; mk = mk->next) {
            if (dst.write_JFIF_header && mk->marker == JPEG_APP0 && mk->data_length >= 5 &&
                memcmp(mk->data, "JFIF", 5) == 0)
                continue;
            if (dst.write_Adobe_marker && mk->marker == JPEG_APP0 + 14 && mk->data_length >= 5 &&
                memcmp(mk->data, "Adobe", 5) == 0)
                continue;
            jpeg_write_marker(&dst, mk->marker, mk->data, mk->data_length);
        }
        jpeg_finish_compress(&dst);
        jpeg_finish_decompress(&src);
    }
done:
    jpeg_destroy_compress(&dst);
    jpeg_destroy_decompress(&src);
    return reason;
}

static PyObject *transcode_restarts(PyObject *self, PyObject *args)
{
    Py_buffer data;
    int cell_px = 32;
    unsigned char *out = NULL;
    unsigned long out_size = 0;
    const char *reason;
    char msg[JMSG_LENGTH_MAX] = "";
    PyObject *result;

    (void)self;
    if (!PyArg_ParseTuple(args, "y*|i:transcode_restarts", &data, &cell_px))
        return NULL;
    if (cell_px < 8) {
        PyBuffer_Release(&data);
        return PyErr_Format(PyExc_ValueError, "transcode_restarts: cell_px %d < 8", cell_px);
    }
    Py_BEGIN_ALLOW_THREADS
    reason = transcode((const unsigned char *)data.buf, (size_t)data.len, cell_px, &out, &out_size, msg);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    if (reason == NULL)
        result = PyBytes_FromStringAndSize((const char *)out, (Py_ssize_t)out_size);
    else if (msg[0])
        result = PyUnicode_FromFormat("%s: %s", reason, msg);
    else
        result = PyUnicode_FromString(reason);
    free(out);
    return result;
}

static PyObject *restart_cells(PyObject *self, PyObject *args)
{
    Py_buffer data;
    cells_t c;
    int ok;

    (void)self;
    if (!PyArg_ParseTuple(args, "y*:restart_cells", &data))
        return NULL;
    ok = cells_parse((const unsigned char *)data.buf, (size_t)data.len, &c) == 0;
    PyBuffer_Release(&data);
    if (!ok)
        Py_RETURN_NONE;
    cells_free(&c);
    return Py_BuildValue("(iiii)", c.qy, c.qx, c.cell_h, c.cell_w);
}

static PyObject *cut_box(PyObject *self, PyObject *args)
{
    Py_buffer data;
    cells_t c;
    int y0, x0, h, w, cy0, cy1, cx0, cx1;
    unsigned char *buf = NULL;
    size_t n = 0;
    PyObject *result = NULL;

    (void)self;
    if (!PyArg_ParseTuple(args, "y*iiii:cut_box", &data, &y0, &x0, &h, &w))
        return NULL;
    if (cells_parse((const unsigned char *)data.buf, (size_t)data.len, &c) != 0) {
        PyBuffer_Release(&data);
        Py_RETURN_NONE;
    }
    if (y0 >= 0 && x0 >= 0 && h > 0 && w > 0 && y0 + h <= c.height && x0 + w <= c.width &&
        cells_for_box(&c, 1, y0, x0, h, w, &cy0, &cy1, &cx0, &cx1)) {
        n = cells_cut((const unsigned char *)data.buf, &c, cy0, cy1, cx0, cx1, &buf);
        if (n)
            result = Py_BuildValue("(y#ii)", (const char *)buf, (Py_ssize_t)n, cy0 * c.cell_h, cx0 * c.cell_w);
        else
            PyErr_NoMemory();
        free(buf);
    } else {
        result = Py_None;
        Py_INCREF(result);
    }
    cells_free(&c);
    PyBuffer_Release(&data);
    return result;
}

static PyObject *cut_counts(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return Py_BuildValue("{s:k,s:k,s:k}", "cut", cuts_done, "whole", cuts_whole, "cut_failed", cuts_failed);
}

static PyObject *decode_into(PyObject *self, PyObject *args)
{
    Py_buffer data, out;
    int height, width, k, y0, x0, h, w;
    const char *reason = NULL;
    char msg[JMSG_LENGTH_MAX] = "";
    int how = 0;

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
    reason = decode_cells((const unsigned char *)data.buf, (size_t)data.len, (unsigned char *)out.buf,
                          height, width, k, y0, x0, h, w, msg, &how);
    Py_END_ALLOW_THREADS
    if (how > 0) cuts_done++; else if (how == 0) cuts_whole++; else cuts_failed++;
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
     "(y0, x0, h, w) of the 1/k-scale image into out (h*w*3 bytes, RGB); through the restart-marker "
     "cut where the JPEG allows it."},
    {"transcode_restarts", transcode_restarts, METH_VARARGS,
     "transcode_restarts(data, cell_px=32) -> bytes | reason: the same DCT coefficients, baseline, "
     "optimized Huffman tables, a restart interval of cells about cell_px wide."},
    {"restart_cells", restart_cells, METH_VARARGS,
     "restart_cells(data) -> (rows, cols, cell_h, cell_w) | None: the grid decode_into can cut at."},
    {"cut_box", cut_box, METH_VARARGS,
     "cut_box(data, y0, x0, h, w) -> (jpeg, top, left) | None: the JPEG of the restart cells that hold "
     "the full-res box (plus a margin), and where it starts in the image; None: nothing to cut."},
    {"cut_counts", cut_counts, METH_NOARGS,
     "cut_counts() -> {'cut', 'whole', 'cut_failed'}: decode_into calls this process, by path."},
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
