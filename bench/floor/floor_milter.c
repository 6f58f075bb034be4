/*
 * floor_milter: the benchmark's "floor" (bench/bench.py, configuration "floor").
 *
 * A minimal libmilter milter that receives the whole message and makes exactly the
 * edits the relay milter makes on an accepted signed-ingress message, with no checks
 * at all (no DKIM verification, no tenant policy):
 *
 *   - delete the tenant's hop signature (DKIM-Signature with d=<signing domain>) and any
 *     client-sent X-Relay-Route / X-Relay-Route-Seal, bottom up;
 *   - change Reply-To (or add it) when the tenant sets headers.reply_to;
 *   - insert Authentication-Results at the top (dkim=pass, tags copied from the signature);
 *   - add the route marker X-Relay-Route: <tenant>;
 *   - decode every recipient: delrcpt <alice=example.org@acme.relay> and
 *     addrcpt <alice@example.org> with ORCPT=rfc822;alice@example.org;
 *   - change the envelope sender when the tenant sets headers.envelope_sender;
 *   - add the route seal X-Relay-Route-Seal: <tenant>.<hex> (precomputed by bench.py).
 *
 * It negotiates the cheapest protocol a milter that needs the headers and the body can
 * have: no reply for connect/helo/header/body, no data/eoh/unknown callbacks.
 *
 * Usage: floor_milter SOCKET AUTHSERV TENANT...
 *   TENANT = relay_domain,tenant_id,seal,signing_domain,reply_to,envelope_sender
 *            (reply_to and envelope_sender may be empty)
 *
 * Built by bench.py with: cc -O2 -o floor_milter floor_milter.c -lmilter -lpthread
 * A benchmark tool: it accepts whatever it is given and must never face real mail.
 */

#include <libmilter/mfapi.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_TENANTS 64
#define MAX_RCPTS 1000
#define MAX_DELETES 64

struct tenant {
	char *relay_domain, *id, *seal, *signing_domain, *reply_to, *envelope_sender;
};

static struct tenant tenants[MAX_TENANTS];
static int ntenants;
static const char *authserv;

struct del {
	const char *name; /* static string */
	int index;
};

struct msg {
	const struct tenant *t;
	int nrcpt;
	char *rcpt[MAX_RCPTS];
	int ndkim, nreplyto, nroute, nseal;
	int ndel;
	struct del del[MAX_DELETES];
	char ar[1024]; /* the Authentication-Results value */
	char spbuf[1100]; /* " value" for an added header (sp()) */
};

static const struct tenant *tenant_for(const char *rcpt)
{
	const char *at = strrchr(rcpt, '@');
	if (!at)
		return NULL;
	size_t n = strlen(at + 1);
	if (n && at[n] == '>')
		n--;
	for (int i = 0; i < ntenants; i++)
		if (strlen(tenants[i].relay_domain) == n && strncasecmp(at + 1, tenants[i].relay_domain, n) == 0)
			return &tenants[i];
	return NULL;
}

/* Copy tag `name` of a DKIM-Signature value into out (white space removed), at most max-1 chars. */
static int sig_tag(const char *v, const char *name, char *out, size_t max)
{
	size_t nl = strlen(name);
	const char *p = v;
	while (*p) {
		while (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n' || *p == ';')
			p++;
		if (strncmp(p, name, nl) == 0) {
			const char *q = p + nl;
			while (*q == ' ' || *q == '\t')
				q++;
			if (*q == '=') {
				size_t o = 0;
				for (q++; *q && *q != ';'; q++)
					if (!strchr(" \t\r\n", *q) && o + 1 < max)
						out[o++] = *q;
				out[o] = 0;
				return 1;
			}
		}
		p = strchr(p, ';');
		if (!p)
			break;
	}
	out[0] = 0;
	return 0;
}

static struct msg *get(SMFICTX *ctx)
{
	return (struct msg *)smfi_getpriv(ctx);
}

static void reset(struct msg *m)
{
	for (int i = 0; i < m->nrcpt; i++)
		free(m->rcpt[i]);
	memset(m, 0, sizeof *m);
}

static sfsistat fl_negotiate(SMFICTX *ctx, unsigned long f0, unsigned long f1, unsigned long f2, unsigned long f3,
			     unsigned long *pf0, unsigned long *pf1, unsigned long *pf2, unsigned long *pf3)
{
	(void)f2;
	(void)f3;
	unsigned long want = SMFIP_NR_CONN | SMFIP_NR_HELO | SMFIP_NR_HDR | SMFIP_NR_BODY | SMFIP_NODATA |
			     SMFIP_NOEOH | SMFIP_NOUNKNOWN;
	*pf0 = f0 & (SMFIF_ADDHDRS | SMFIF_CHGHDRS | SMFIF_ADDRCPT | SMFIF_ADDRCPT_PAR | SMFIF_DELRCPT | SMFIF_CHGFROM);
	/* Header values exactly as written, as the relay's milter does: without
	 * SMFIP_HDR_LEADSPC Postfix inserts a space after the colon of an added header,
	 * and the exact-match route table (X-Relay-Route:<tenant>) would not match. */
	*pf1 = f1 & (want | SMFIP_HDR_LEADSPC);
	*pf2 = 0;
	*pf3 = 0;
	struct msg *m = calloc(1, sizeof *m);
	if (!m)
		return SMFIS_TEMPFAIL;
	smfi_setpriv(ctx, m);
	return SMFIS_CONTINUE;
}

static sfsistat fl_connect(SMFICTX *ctx, char *host, _SOCK_ADDR *addr)
{
	(void)ctx;
	(void)host;
	(void)addr;
	return SMFIS_NOREPLY;
}

static sfsistat fl_helo(SMFICTX *ctx, char *helo)
{
	(void)ctx;
	(void)helo;
	return SMFIS_NOREPLY;
}

static sfsistat fl_envfrom(SMFICTX *ctx, char **argv)
{
	(void)argv;
	struct msg *m = get(ctx);
	if (!m)
		return SMFIS_TEMPFAIL;
	reset(m);
	return SMFIS_CONTINUE;
}

static sfsistat fl_envrcpt(SMFICTX *ctx, char **argv)
{
	struct msg *m = get(ctx);
	if (!m || m->nrcpt >= MAX_RCPTS)
		return SMFIS_TEMPFAIL;
	if (!m->t)
		m->t = tenant_for(argv[0]);
	if (!m->t)
		return SMFIS_TEMPFAIL;
	m->rcpt[m->nrcpt] = strdup(argv[0]);
	if (!m->rcpt[m->nrcpt])
		return SMFIS_TEMPFAIL;
	m->nrcpt++;
	return SMFIS_CONTINUE;
}

static void delete_later(struct msg *m, const char *name, int index)
{
	if (m->ndel < MAX_DELETES) {
		m->del[m->ndel].name = name;
		m->del[m->ndel].index = index;
		m->ndel++;
	}
}

static sfsistat fl_header(SMFICTX *ctx, char *name, char *value)
{
	struct msg *m = get(ctx);
	if (!m || !m->t)
		return SMFIS_NOREPLY; /* eom tempfails */
	if (strcasecmp(name, "DKIM-Signature") == 0) {
		char d[256], tag[512];
		m->ndkim++;
		sig_tag(value, "d", d, sizeof d);
		size_t dl = strlen(d);
		if (dl && d[dl - 1] == '.')
			d[dl - 1] = 0;
		if (strcasecmp(d, m->t->signing_domain) == 0) {
			delete_later(m, "DKIM-Signature", m->ndkim);
			if (!m->ar[0]) {
				char a[64], s[128], b[16], i[256];
				sig_tag(value, "a", a, sizeof a);
				sig_tag(value, "s", s, sizeof s);
				sig_tag(value, "b", tag, sizeof tag);
				tag[8] = 0;
				/* base64's '/' is an RFC 2045 tspecial: the relay quotes such a value */
				snprintf(b, sizeof b, strchr(tag, '/') ? "\"%s\"" : "%s", tag);
				if (!sig_tag(value, "i", i, sizeof i))
					snprintf(i, sizeof i, "@%s", m->t->signing_domain);
				snprintf(m->ar, sizeof m->ar, "%s; dkim=pass header.d=%s header.i=%s header.a=%s header.s=%s header.b=%s",
					 authserv, m->t->signing_domain, i, a, s, b);
			}
		}
	} else if (strcasecmp(name, "Reply-To") == 0) {
		m->nreplyto++;
	} else if (strcasecmp(name, "X-Relay-Route") == 0) {
		delete_later(m, "X-Relay-Route", ++m->nroute);
	} else if (strcasecmp(name, "X-Relay-Route-Seal") == 0) {
		delete_later(m, "X-Relay-Route-Seal", ++m->nseal);
	}
	return SMFIS_NOREPLY;
}

static sfsistat fl_body(SMFICTX *ctx, unsigned char *chunk, size_t len)
{
	(void)ctx;
	(void)chunk;
	(void)len;
	return SMFIS_NOREPLY;
}

static int by_name_then_index_desc(const void *a, const void *b)
{
	const struct del *x = a, *y = b;
	int c = strcasecmp(x->name, y->name);
	return c ? c : y->index - x->index;
}

/* RFC 3461 xtext, into out (at most max-1 chars). */
static void xtext(const char *in, char *out, size_t max)
{
	size_t o = 0;
	for (; *in && o + 4 < max; in++) {
		unsigned char c = (unsigned char)*in;
		if (c >= '!' && c <= '~' && c != '+' && c != '=')
			out[o++] = c;
		else
			o += snprintf(out + o, max - o, "+%02X", c);
	}
	out[o] = 0;
}

#define EDIT(call)                          \
	do {                                \
		if ((call) != MI_SUCCESS) { \
			reset(m);           \
			return SMFIS_TEMPFAIL; \
		}                           \
	} while (0)

/* " value": the space after the colon that Postfix no longer inserts (SMFIP_HDR_LEADSPC). */
static char *sp(struct msg *m, const char *value)
{
	snprintf(m->spbuf, sizeof m->spbuf, " %s", value);
	return m->spbuf;
}

static sfsistat fl_eom(SMFICTX *ctx)
{
	struct msg *m = get(ctx);
	if (!m || !m->t || !m->nrcpt || !m->ar[0])
		return SMFIS_TEMPFAIL;
	const struct tenant *t = m->t;
	qsort(m->del, m->ndel, sizeof m->del[0], by_name_then_index_desc);
	for (int i = 0; i < m->ndel; i++)
		EDIT(smfi_chgheader(ctx, (char *)m->del[i].name, m->del[i].index, NULL));
	if (t->reply_to[0]) {
		if (m->nreplyto)
			for (int i = 1; i <= m->nreplyto; i++)
				EDIT(smfi_chgheader(ctx, "Reply-To", i, sp(m, t->reply_to)));
		else
			EDIT(smfi_addheader(ctx, "Reply-To", sp(m, t->reply_to)));
	}
	EDIT(smfi_insheader(ctx, 0, "Authentication-Results", sp(m, m->ar)));
	EDIT(smfi_addheader(ctx, "X-Relay-Route", t->id));
	for (int i = 0; i < m->nrcpt; i++) {
		/* <alice=example.org@acme.relay> -> <alice@example.org> (split at the last '=') */
		const char *r = m->rcpt[i];
		if (*r == '<')
			r++;
		const char *at = strrchr(r, '@');
		char local[600], decoded[610], params[700], xt[600];
		size_t ll = at ? (size_t)(at - r) : strlen(r);
		if (ll >= sizeof local)
			ll = sizeof local - 1;
		memcpy(local, r, ll);
		local[ll] = 0;
		char *eq = strrchr(local, '=');
		if (!eq) {
			reset(m);
			return SMFIS_TEMPFAIL;
		}
		*eq = 0;
		snprintf(decoded, sizeof decoded, "%s@%s", local, eq + 1);
		xtext(decoded, xt, sizeof xt);
		snprintf(params, sizeof params, "ORCPT=rfc822;%s", xt);
		char bracketed[620];
		snprintf(bracketed, sizeof bracketed, "<%s>", decoded);
		EDIT(smfi_delrcpt(ctx, m->rcpt[i]));
		EDIT(smfi_addrcpt_par(ctx, bracketed, params));
	}
	if (t->envelope_sender[0]) {
		char from[600];
		snprintf(from, sizeof from, "<%s>", t->envelope_sender);
		EDIT(smfi_chgfrom(ctx, from, NULL));
	}
	EDIT(smfi_addheader(ctx, "X-Relay-Route-Seal", t->seal));
	reset(m);
	return SMFIS_CONTINUE;
}

static sfsistat fl_abort(SMFICTX *ctx)
{
	struct msg *m = get(ctx);
	if (m)
		reset(m);
	return SMFIS_CONTINUE;
}

static sfsistat fl_close(SMFICTX *ctx)
{
	struct msg *m = get(ctx);
	if (m) {
		reset(m);
		free(m);
		smfi_setpriv(ctx, NULL);
	}
	return SMFIS_CONTINUE;
}

static struct smfiDesc desc = {
	"floor-milter",
	SMFI_VERSION,
	SMFIF_ADDHDRS | SMFIF_CHGHDRS | SMFIF_ADDRCPT | SMFIF_ADDRCPT_PAR | SMFIF_DELRCPT | SMFIF_CHGFROM,
	fl_connect,
	fl_helo,
	fl_envfrom,
	fl_envrcpt,
	fl_header,
	NULL, /* eoh */
	fl_body,
	fl_eom,
	fl_abort,
	fl_close,
	NULL, /* unknown */
	NULL, /* data */
	fl_negotiate,
};

static char *field(char **p)
{
	char *s = *p, *c = strchr(s, ',');
	if (c) {
		*c = 0;
		*p = c + 1;
	} else {
		*p = s + strlen(s);
	}
	return s;
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: %s SOCKET AUTHSERV relay_domain,tenant_id,seal,signing_domain,reply_to,envelope_sender...\n",
			argv[0]);
		return 2;
	}
	authserv = argv[2];
	for (int i = 3; i < argc && ntenants < MAX_TENANTS; i++) {
		char *p = strdup(argv[i]);
		struct tenant *t = &tenants[ntenants++];
		t->relay_domain = field(&p);
		t->id = field(&p);
		t->seal = field(&p);
		t->signing_domain = field(&p);
		t->reply_to = field(&p);
		t->envelope_sender = field(&p);
		if (!*t->relay_domain || !*t->id || !*t->seal || !*t->signing_domain) {
			fprintf(stderr, "floor_milter: bad tenant %s\n", argv[i]);
			return 2;
		}
	}
	const char *sock = argv[1];
	if (strncmp(sock, "unix:", 5) == 0)
		unlink(sock + 5);
	if (smfi_setconn((char *)sock) == MI_FAILURE || smfi_register(desc) == MI_FAILURE) {
		fprintf(stderr, "floor_milter: cannot set up %s\n", sock);
		return 1;
	}
	smfi_settimeout(600);
	/* The socket is born 0666 (Postfix's smtpd runs as postfix): a chmod after it exists
	 * would leave a moment in which a connection is refused and the message tempfails. */
	umask(0111);
	if (smfi_opensocket(1) == MI_FAILURE) {
		fprintf(stderr, "floor_milter: cannot open %s\n", sock);
		return 1;
	}
	return smfi_main() == MI_SUCCESS ? 0 : 1;
}
