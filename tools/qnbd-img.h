/* tools/qnbd-img.h: what the files of qnbd-img share.  Each subcommand
 * is a file of its own (create.c, info.c, check.c) with one entry point
 * called by main.c; options.c parses what several of them take,
 * progress.c draws -p.
 */
#ifndef QNBD_IMG_H
#define QNBD_IMG_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

/* A subcommand: argv[0] is its name; returns the exit status. */
int cmd_create (int argc, char **argv);
int cmd_info (int argc, char **argv);
int cmd_map (int argc, char **argv);
int cmd_check (int argc, char **argv);

/* ---- options.c ---- */

/* "512", "64K", "1G", "2T" (powers of 1024; K, M, G, T, P, E, either
 * case; a trailing B allowed).  0, or -EINVAL when s is not such a size.
 */
int parse_size (const char *s, uint64_t *out);
/* on/off, yes/no, true/false.  0 or -EINVAL. */
int parse_bool (const char *s, bool *out);
/* Print "qnbd-img: " and the message to stderr. */
void img_error (const char *fmt, ...)
  __attribute__ ((format (printf, 1, 2)));

/* s as a JSON string on f: quotes, backslashes and control characters
 * escaped.
 */
void img_json_string (FILE *f, const char *s);

/* ---- progress.c: -p ---- */

struct progress {
  bool on;                      /* asked for, and stderr is a terminal */
  int shown;                    /* hundredths of a percent on screen */
};

/* Show progress from now on if wanted and stderr is a terminal. */
void progress_start (struct progress *p, bool wanted);
/* done of total (the engine's progress callbacks: opaque is p). */
void progress_update (void *opaque, uint64_t done, uint64_t total);
/* 100%, and the line ended. */
void progress_end (struct progress *p);

#endif /* QNBD_IMG_H */
