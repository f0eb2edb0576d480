/* tap._wire: the two per-message loops of the data path, in C.
 *
 * Both have a pure-Python twin that stays the reference and the fallback
 * when this module is not built (tap/protocol.py MessageReader.split,
 * maskd/engine.py RowMasker._rules_loop); tests/unit/test_wire_native.py
 * runs both on the same generated input and compares them.
 *
 * The bytes come from PostgreSQL or from a client: every offset is checked
 * against the buffer before it is read, and no offset read from the bytes is
 * trusted before that check. Nothing here allocates per byte; the only
 * Python objects built are the results.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static int32_t be32(const unsigned char *p)
{
    return (int32_t)(((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) |
                     ((uint32_t)p[2] << 8) | (uint32_t)p[3]);
}

static int16_t be16(const unsigned char *p)
{
    return (int16_t)(((uint16_t)p[0] << 8) | (uint16_t)p[1]);
}

/* A new tuple of three ints; NULL with an exception set on failure. */
static PyObject *triple(Py_ssize_t a, Py_ssize_t b, Py_ssize_t c)
{
    PyObject *t = PyTuple_New(3);
    if (t == NULL)
        return NULL;
    const Py_ssize_t v[3] = {a, b, c};
    for (int k = 0; k < 3; k++) {
        PyObject *n = PyLong_FromSsize_t(v[k]);
        if (n == NULL) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, k, n);
    }
    return t;
}

/* Appends ``item``, a new reference (NULL when building it failed), to
 * ``list`` and releases it; -1 with an exception set on failure. */
static int append_new(PyObject *list, PyObject *item)
{
    if (item == NULL)
        return -1;
    int rc = PyList_Append(list, item);
    Py_DECREF(item);
    return rc;
}

/* split_frames(data, max_size) -> (frames, consumed, bad_length)
 *
 * Frames every complete message at the start of ``data`` (type byte, int32
 * length that counts itself, body). ``frames`` is a list of
 * (type, start, end) with start at the type byte and end exclusive;
 * ``consumed`` is where the first incomplete message starts. When a length
 * is below 4 or above ``max_size`` the walk stops there and ``bad_length``
 * is that length (the caller raises); otherwise it is None. */
static PyObject *split_frames(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer view;
    Py_ssize_t max_size;
    if (!PyArg_ParseTuple(args, "y*n", &view, &max_size))
        return NULL;
    const unsigned char *buf = view.buf;
    Py_ssize_t end = view.len, pos = 0;
    PyObject *bad = Py_None;
    PyObject *frames = PyList_New(0);
    if (frames == NULL)
        goto fail;
    while (end - pos >= 5) {
        int32_t length = be32(buf + pos + 1);
        if (length < 4 || (Py_ssize_t)length > max_size) {
            bad = PyLong_FromLong(length);
            if (bad == NULL)
                goto fail;
            break;
        }
        Py_ssize_t stop = pos + 1 + (Py_ssize_t)length;
        if (stop > end)
            break;
        if (append_new(frames, triple(buf[pos], pos, stop)) < 0)
            goto fail;
        pos = stop;
    }
    PyBuffer_Release(&view);
    if (bad == Py_None)
        Py_INCREF(bad);
    PyObject *result = Py_BuildValue("(NnN)", frames, pos, bad);
    return result;
fail:
    Py_XDECREF(frames);
    if (bad != Py_None)
        Py_XDECREF(bad);
    PyBuffer_Release(&view);
    return NULL;
}

/* Reads (type, start, end) of one frame; -1 with an exception set when it
 * is not a tuple of three ints. */
static int frame_at(PyObject *seq, Py_ssize_t i, Py_ssize_t *start, Py_ssize_t *stop)
{
    PyObject *frame = PySequence_Fast_GET_ITEM(seq, i);
    if (!PyTuple_Check(frame) || PyTuple_GET_SIZE(frame) != 3) {
        PyErr_SetString(PyExc_TypeError, "a frame is a (type, start, end) tuple");
        return -1;
    }
    *start = PyLong_AsSsize_t(PyTuple_GET_ITEM(frame, 1));
    if (*start == -1 && PyErr_Occurred())
        return -1;
    *stop = PyLong_AsSsize_t(PyTuple_GET_ITEM(frame, 2));
    if (*stop == -1 && PyErr_Occurred())
        return -1;
    return 0;
}

enum { RULE_NONE = 0, RULE_LAST4 = 1, RULE_OTHER = 2, SCAN_TEXT = 3 };

/* The fewest ASCII digits a card number has (maskd.detect.MIN_DIGITS). */
#define PAN_MIN_DIGITS 13

/* walk_rules(block, frames, lo, hi, kinds, max_message)
 *     -> (rewritten, found, pending, flagged) | None
 *
 * Walks the DataRows frames[lo:hi] of ``block`` (a contiguous run) field by
 * field. ``kinds`` has one byte per column: 0 nothing to do, 1 ``last4`` on
 * text, 2 a rule the caller applies, 3 text the caller scans for card
 * numbers. For a ``last4`` value longer than four bytes whose last four
 * bytes are ASCII digits, every other ASCII digit becomes 'X' in the copy;
 * any other non-NULL value of a rule column is listed in ``pending`` as
 * (column, offset in block, length) for the caller. ``found`` counts the
 * non-NULL values of each rule column. ``rewritten`` is block[first:last]
 * with those changes, or None when no column has a rule. ``flagged`` lists
 * (as offsets from lo, ascending) the rows with a scanned value that could
 * hold a card number: 13 ASCII digits or more, or a backslash (an escape
 * or bytea hex may spell digits). A value with fewer digits and no
 * backslash cannot hold one, so every other row is certain.
 *
 * None when any row does not fit: a message of ``max_message`` bytes or
 * more, a field count other than len(kinds), a field running past its
 * message, or fields that do not end exactly at the message's end. The
 * caller then takes the per-row path, which reports the malformed row. */
static PyObject *walk_rules(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer view, kinds_view;
    PyObject *frames_obj;
    Py_ssize_t lo, hi, max_message;
    if (!PyArg_ParseTuple(args, "y*Onny*n", &view, &frames_obj, &lo, &hi, &kinds_view,
                          &max_message))
        return NULL;
    PyObject *result = NULL, *seq = NULL, *out = NULL, *found = NULL, *pending = NULL;
    PyObject *flagged = NULL;
    Py_ssize_t *counts = NULL;
    const unsigned char *block = view.buf;
    const unsigned char *kinds = kinds_view.buf;
    Py_ssize_t ncols = kinds_view.len;
    Py_ssize_t blen = view.len;
    int has_rules = 0;
    for (Py_ssize_t c = 0; c < ncols; c++)
        has_rules |= kinds[c] == RULE_LAST4 || kinds[c] == RULE_OTHER;

    seq = PySequence_Fast(frames_obj, "frames must be a sequence");
    if (seq == NULL)
        goto done;
    Py_ssize_t nframes = PySequence_Fast_GET_SIZE(seq);
    if (lo < 0 || hi > nframes || hi <= lo || ncols > 0x7fff) {
        PyErr_SetString(PyExc_ValueError, "bad run bounds or column count");
        goto done;
    }
    Py_ssize_t first, last, ignored;
    if (frame_at(seq, lo, &first, &ignored) < 0 || frame_at(seq, hi - 1, &ignored, &last) < 0)
        goto done;
    if (first < 0 || last > blen || last < first)
        goto none;
    unsigned char *dst = NULL;
    if (has_rules) {
        out = PyBytes_FromStringAndSize((const char *)block + first, last - first);
        if (out == NULL)
            goto done;
        dst = (unsigned char *)PyBytes_AS_STRING(out);
    }
    counts = PyMem_Calloc((size_t)(ncols ? ncols : 1), sizeof(Py_ssize_t));
    pending = PyList_New(0);
    flagged = PyList_New(0);
    if (counts == NULL || pending == NULL || flagged == NULL) {
        if (counts == NULL)
            PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t expected_start = first;
    for (Py_ssize_t i = lo; i < hi; i++) {
        Py_ssize_t s, e;
        if (frame_at(seq, i, &s, &e) < 0)
            goto done;
        /* The run is contiguous and inside the block. */
        if (s != expected_start || e > last || e - s < 7 || e - s >= max_message)
            goto none;
        expected_start = e;
        if (block[s] != 'D' || be16(block + s + 5) != ncols)
            goto none;
        Py_ssize_t pos = s + 7;
        int candidate = 0;
        for (Py_ssize_t c = 0; c < ncols; c++) {
            if (e - pos < 4)
                goto none;
            Py_ssize_t length = be32(block + pos);
            pos += 4;
            if (length < 0)
                continue; /* NULL */
            if (length > e - pos)
                goto none;
            unsigned char kind = kinds[c];
            if (kind == SCAN_TEXT) {
                const unsigned char *v = block + pos;
                Py_ssize_t digits = 0;
                for (Py_ssize_t k = 0; k < length && !candidate; k++) {
                    if (v[k] >= '0' && v[k] <= '9')
                        candidate = ++digits >= PAN_MIN_DIGITS;
                    else if (v[k] == '\\')
                        candidate = 1;
                }
            } else if (kind != RULE_NONE) {
                counts[c]++;
                const unsigned char *v = block + pos;
                if (kind == RULE_LAST4 && length > 4 &&
                    v[length - 4] >= '0' && v[length - 4] <= '9' &&
                    v[length - 3] >= '0' && v[length - 3] <= '9' &&
                    v[length - 2] >= '0' && v[length - 2] <= '9' &&
                    v[length - 1] >= '0' && v[length - 1] <= '9') {
                    unsigned char *w = dst + (pos - first);
                    for (Py_ssize_t k = 0; k < length - 4; k++)
                        if (w[k] >= '0' && w[k] <= '9')
                            w[k] = 'X';
                } else {
                    if (append_new(pending, triple(c, pos, length)) < 0)
                        goto done;
                }
            }
            pos += length;
        }
        if (pos != e)
            goto none;
        if (candidate && append_new(flagged, PyLong_FromSsize_t(i - lo)) < 0)
            goto done;
    }
    found = PyList_New(ncols);
    if (found == NULL)
        goto done;
    for (Py_ssize_t c = 0; c < ncols; c++) {
        PyObject *n = PyLong_FromSsize_t(counts[c]);
        if (n == NULL)
            goto done;
        PyList_SET_ITEM(found, c, n);
    }
    result = PyTuple_Pack(4, out ? out : Py_None, found, pending, flagged);
    goto done;
none:
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(seq);
    Py_XDECREF(out);
    Py_XDECREF(found);
    Py_XDECREF(pending);
    Py_XDECREF(flagged);
    PyMem_Free(counts);
    PyBuffer_Release(&view);
    PyBuffer_Release(&kinds_view);
    return result;
}

/* run_end(frames, i, kind) -> j
 *
 * The first index at or after ``i`` whose frame's type is not ``kind`` (or
 * len(frames)): where a run of messages of one type ends. */
static PyObject *run_end(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *frames;
    Py_ssize_t i;
    long kind;
    if (!PyArg_ParseTuple(args, "O!nl", &PyList_Type, &frames, &i, &kind))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(frames);
    if (i < 0)
        i = 0;
    for (; i < n; i++) {
        PyObject *frame = PyList_GET_ITEM(frames, i);
        if (!PyTuple_Check(frame) || PyTuple_GET_SIZE(frame) < 1) {
            PyErr_SetString(PyExc_TypeError, "a frame is a (type, start, end) tuple");
            return NULL;
        }
        long t = PyLong_AsLong(PyTuple_GET_ITEM(frame, 0));
        if (t == -1 && PyErr_Occurred())
            return NULL;
        if (t != kind)
            break;
    }
    return PyLong_FromSsize_t(i);
}

static PyMethodDef methods[] = {
    {"run_end", run_end, METH_VARARGS, "run_end(frames, i, kind) -> j"},
    {"split_frames", split_frames, METH_VARARGS,
     "split_frames(data, max_size) -> (frames, consumed, bad_length)"},
    {"walk_rules", walk_rules, METH_VARARGS,
     "walk_rules(block, frames, lo, hi, kinds, max_message)"
     " -> (rewritten, found, pending, flagged) | None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "tap._wire",
    .m_doc = "The data path's per-message loops in C (pure-Python twins in tap.protocol and maskd.engine).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__wire(void)
{
    return PyModule_Create(&module);
}
